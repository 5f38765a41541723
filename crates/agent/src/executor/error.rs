//! Why an attempt was refused, or why a step of it failed.
//!
//! Key design decision: a refusal and a failure are two types. A
//! `Refusal` says this agent cannot run the attempt as asked (a sandbox
//! kind it does not run, Docker off, a runtime or a limit its engine
//! lacks, a user it cannot switch to): the attempt is reported
//! `rejected`, nothing was started, and it never runs in a weaker sandbox.
//! An `Error` says a step failed (a spawn, an engine that did not answer,
//! a pull): the attempt is reported `failed`, which the job's retry policy
//! may retry. The wire carries only their texts, in the result's `error`.

use std::path::PathBuf;

use tokio::task::JoinError;

use super::output::OutputsFileError;
use crate::config::SandboxKind;
use crate::docker;
use crate::process::UserError;

/// Why this agent refuses to run an attempt.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("action '{action}' is not in this agent's allow-list")]
    ActionNotAllowed { action: String },
    #[error("agent at capacity ({capacity} attempts running)")]
    AtCapacity { capacity: u32 },
    /// Not signed by the key the agent trusts, changed after signing, or
    /// expired (`drover_proto::signing`).
    #[error("assignment signature does not verify: {0}")]
    Signature(#[from] drover_proto::signing::Error),
    #[error("workspace id '{id}' is not valid")]
    InvalidWorkspaceId { id: String },
    /// A workspace built-in without the workspace it is about.
    #[error("{builtin} needs a workspace in its assignment")]
    NoWorkspaceSpec { builtin: String },
    #[error(
        "sandbox '{sandbox}' is a {} sandbox, which this agent does not run (allow_sandboxes: {})",
        kind.as_str(),
        kinds(allowed)
    )]
    KindNotAllowed {
        sandbox: String,
        kind: SandboxKind,
        allowed: Vec<SandboxKind>,
    },
    /// The profile breaks a rule of `drover_proto::sandbox` (the server
    /// checks them too, but the agent enforces only what it understands).
    #[error("{0}")]
    InvalidProfile(String),
    #[error("sandbox '{sandbox}' needs Docker, which is off on this agent (docker_host: off)")]
    DockerOff { sandbox: String },
    #[error(
        "sandbox '{sandbox}' runs as user '{user}', but this agent cannot switch users: the agent is not running as root"
    )]
    CannotSwitchUsers { sandbox: String, user: String },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(
        "sandbox '{sandbox}' sets limits the Docker engine on this agent cannot enforce: {} (see `docker info` warnings)",
        limits.join(", ")
    )]
    Unenforced {
        sandbox: String,
        limits: Vec<&'static str>,
    },
    #[error(
        "runtime '{wanted}' is not available on this agent (the engine offers: {})",
        offered(engine)
    )]
    NoRuntime { wanted: String, engine: Vec<String> },
    /// The workspace's git source breaks a rule of `drover_proto::sandbox`.
    #[error("{0}")]
    InvalidGitSource(String),
    /// A local repository outside the roots this agent allows (the agent
    /// clones as root; a task must not read what its user could not).
    #[error(
        "git.repo '{repo}' is a path on this agent, and this agent clones local repositories only under its workspace_local_roots ({})",
        roots_text(roots)
    )]
    LocalRepository { repo: String, roots: Vec<PathBuf> },
}

fn roots_text(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        "none set".to_owned()
    } else {
        let names: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        names.join(", ")
    }
}

fn kinds(kinds: &[SandboxKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    names.join(", ")
}

fn offered(runtimes: &[String]) -> String {
    if runtimes.is_empty() {
        "none".to_owned()
    } else {
        runtimes.join(", ")
    }
}

/// Why a step of an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the action has an empty argv")]
    EmptyArgv,
    #[error("cannot run '{program}': {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for the process failed: {0}")]
    WaitProcess(std::io::Error),
    /// Work moved off the agent's only thread did not come back.
    #[error("{what} failed: {source}")]
    Blocking {
        what: &'static str,
        source: JoinError,
    },
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the mode of {}: {source}", path.display())]
    SetMode {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hand {} to uid {uid}: {source}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    OutputsFile(#[from] OutputsFileError),
    /// The record a restart would need to stop the attempt.
    #[error("cannot record the running attempt: {0}")]
    Record(#[from] crate::survivors::Error),

    // ---- workspaces ----
    #[error(
        "workspace '{id}' does not exist on this agent (it is created by builtin:workspace-create)"
    )]
    NoWorkspace { id: String },
    #[error(
        "workspace '{id}' has no container on this agent (it is created by builtin:workspace-create)"
    )]
    NoWorkspaceContainer { id: String },
    #[error("workspace '{id}': container {name} is not running")]
    WorkspaceContainerDown { id: String, name: String },
    #[error("cannot clear what is left of workspace {id}: {}", leftovers.join(", "))]
    ClearWorkspace { id: String, leftovers: Vec<String> },
    #[error("could not remove workspace {id}: {}", leftovers.join(", "))]
    RemoveWorkspace { id: String, leftovers: Vec<String> },
    #[error("workspace image: {0}")]
    WorkspaceImage(Box<Error>),
    #[error("workspace volume: {0}")]
    WorkspaceVolume(docker::Error),
    #[error("workspace container: {0}")]
    WorkspaceContainer(docker::Error),
    #[error("workspace container: cannot start it (the image needs `sleep`): {0}")]
    StartWorkspaceContainer(docker::Error),
    #[error(
        "workspace container: {name} stopped right after it started (the image needs `sleep`)"
    )]
    WorkspaceContainerExited { name: String },
    #[error("git checkout of {repo}{at} failed: {source}")]
    Checkout {
        repo: String,
        /// ` at <ref>`, or nothing for the default branch.
        at: String,
        source: Box<Error>,
    },
    #[error("git clone failed (see the log)")]
    Clone,
    #[error("the repository has no branch, tag or commit named '{reference}'")]
    NoSuchRef { reference: String },
    #[error("git checkout of {sha} failed (see the log)")]
    Detach { sha: String },

    // ---- the Docker engine ----
    /// A call that failed in itself: the engine is unreachable, say.
    #[error(transparent)]
    Docker(#[from] docker::Error),
    #[error("cannot inspect image '{image}': {source}")]
    InspectImage {
        image: String,
        source: docker::Error,
    },
    /// The engine lacks the image and the profile says `pull: never`.
    #[error(
        "image '{image}' is not present on this agent's Docker engine and the sandbox's pull \
         policy is never; load it into this engine (`docker load -i FILE` or `docker import`) or \
         build it there (`docker build -t {image} .`), or set `pull: missing` in the sandbox \
         profile to pull it from its registry"
    )]
    ImageMissing { image: String },
    /// A pull failed: with the image absent, how to provide it; with it
    /// present (`pull: always`), how to use that copy.
    #[error("{}", pull_failed(image, source, *present))]
    Pull {
        image: String,
        source: docker::Error,
        /// Whether the engine has the image already.
        present: bool,
    },
    #[error("cannot create the container: {0}")]
    CreateContainer(docker::Error),
    #[error("cannot start the container: {0}")]
    StartContainer(docker::Error),
    #[error("waiting for the container failed: {0}")]
    WaitContainer(docker::Error),
    #[error("inspecting the container failed: {0}")]
    InspectContainer(docker::Error),
    #[error("cannot create the exec: {0}")]
    CreateExec(docker::Error),
    #[error("cannot start the exec: {0}")]
    StartExec(docker::Error),
    #[error("inspecting the exec failed: {0}")]
    InspectExec(docker::Error),
    /// Neither output nor an exit is left to wait for (`container` or
    /// `exec`); the loop never asks then.
    #[error("the {0}'s output and wait both ended")]
    NothingToFollow(&'static str),
    #[error(
        "cannot stop the task: its process{} is not visible from the agent (is the agent in another pid namespace than the Docker engine?)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    ExecNotVisible { pid: Option<i32> },
}

fn pull_failed(image: &str, source: &docker::Error, present: bool) -> String {
    if present {
        format!(
            "pulling image '{image}' failed ({source}) and the sandbox's pull policy is always; \
             set `pull: missing` in the sandbox profile to use the copy this engine has"
        )
    } else {
        format!(
            "image '{image}' is not present on this agent's Docker engine and could not be \
             pulled ({source}); load it into this engine (`docker load -i FILE` or `docker \
             import`) or build it there (`docker build -t {image} .`), and set `pull: never` in \
             the sandbox profile so that no registry is tried"
        )
    }
}

/// Why an attempt did not get to run to its end.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It could not run here: reported `rejected`, nothing was started.
    Rejected(Refusal),
    /// A step failed.
    Failed(Error),
    /// The attempt timed out or was cancelled during a step: the
    /// supervisor knows which.
    Stopped,
}

impl From<Refusal> for Failure {
    fn from(why: Refusal) -> Failure {
        Failure::Rejected(why)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Failed(e)
    }
}

impl From<docker::Error> for Failure {
    fn from(e: docker::Error) -> Failure {
        Failure::Failed(Error::Docker(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts that travel in results, where they are built from fields.
    #[test]
    fn texts_table() {
        let io = || std::io::Error::from_raw_os_error(libc::EACCES);
        let cases: Vec<(String, &str)> = vec![
            (
                Refusal::KindNotAllowed {
                    sandbox: "box".into(),
                    kind: SandboxKind::Docker,
                    allowed: vec![SandboxKind::Process],
                }
                .to_string(),
                "sandbox 'box' is a docker sandbox, which this agent does not run (allow_sandboxes: process)",
            ),
            (
                Refusal::NoRuntime {
                    wanted: "runsc".into(),
                    engine: vec![],
                }
                .to_string(),
                "runtime 'runsc' is not available on this agent (the engine offers: none)",
            ),
            (
                Refusal::Unenforced {
                    sandbox: "d".into(),
                    limits: vec!["memory", "swap"],
                }
                .to_string(),
                "sandbox 'd' sets limits the Docker engine on this agent cannot enforce: memory, swap (see `docker info` warnings)",
            ),
            (
                Error::ExecNotVisible { pid: Some(42) }.to_string(),
                "cannot stop the task: its process (pid 42) is not visible from the agent (is the agent in another pid namespace than the Docker engine?)",
            ),
            (
                Error::ImageMissing { image: "app:1".into() }.to_string(),
                "image 'app:1' is not present on this agent's Docker engine and the sandbox's pull policy is never; load it into this engine (`docker load -i FILE` or `docker import`) or build it there (`docker build -t app:1 .`), or set `pull: missing` in the sandbox profile to pull it from its registry",
            ),
            (
                Error::Pull {
                    image: "app:1".into(),
                    source: docker::Error::Engine { status: 500, message: "lookup registry: no such host".into() },
                    present: false,
                }
                .to_string(),
                "image 'app:1' is not present on this agent's Docker engine and could not be pulled (lookup registry: no such host); load it into this engine (`docker load -i FILE` or `docker import`) or build it there (`docker build -t app:1 .`), and set `pull: never` in the sandbox profile so that no registry is tried",
            ),
            (
                Error::Pull {
                    image: "app:1".into(),
                    source: docker::Error::Engine { status: 500, message: "lookup registry: no such host".into() },
                    present: true,
                }
                .to_string(),
                "pulling image 'app:1' failed (lookup registry: no such host) and the sandbox's pull policy is always; set `pull: missing` in the sandbox profile to use the copy this engine has",
            ),
            (
                Error::ExecNotVisible { pid: None }.to_string(),
                "cannot stop the task: its process is not visible from the agent (is the agent in another pid namespace than the Docker engine?)",
            ),
            (
                Error::Checkout {
                    repo: "/srv/repo".into(),
                    at: " at v1".into(),
                    source: Box::new(Error::Clone),
                }
                .to_string(),
                "git checkout of /srv/repo at v1 failed: git clone failed (see the log)",
            ),
            (
                Error::ClearWorkspace {
                    id: "w1".into(),
                    leftovers: vec!["container drover-ws-w1 (gone)".into(), "/x (busy)".into()],
                }
                .to_string(),
                "cannot clear what is left of workspace w1: container drover-ws-w1 (gone), /x (busy)",
            ),
            (
                Error::SetMode {
                    path: "/state/work".into(),
                    source: io(),
                }
                .to_string(),
                "cannot set the mode of /state/work: Permission denied (os error 13)",
            ),
            (
                Error::StartExec(docker::Error::Timeout(std::time::Duration::from_secs(30)))
                    .to_string(),
                "cannot start the exec: no answer within 30s",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
