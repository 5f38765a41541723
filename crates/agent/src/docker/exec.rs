//! Tasks run in a docker workspace's container, as execs under the
//! workspace's limits and user.
//!
//! The engine has no call to signal an exec, so the agent signals its
//! processes itself: the exec's host pid (`inspect_exec`), its
//! descendants and the members of its session (orphans it left behind),
//! found through `/proc` and each checked to be in the container's cgroup
//! (a pid seen earlier may be another process by now). This needs the
//! agent to see the engine's processes (the same pid namespace); when it
//! does not, a stop fails the attempt with that reason. The exec's end is
//! read from `inspect_exec`, asked often at first and at once when its
//! output ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::jobs::{Assignment, AttemptResult};
use drover_proto::sandbox::{
    DockerSandbox, LimitExceeded, WorkspaceSpec, DROVER_MOUNT, WORKSPACE_MOUNT,
};

use super::api::{Client, ExecConfig};
use super::container::env_list;
use super::{wait_exit, workspace_name, BoxFuture, Engine, OutputState, CALL_TIMEOUT};
use crate::executor::{
    Error, Event, ExecOptions, Exit, Failure, Signal, Supervisor, Workload, OUTPUTS_FILE,
};

/// Runs an attempt as an exec in its docker workspace's container, under
/// the workspace's limits and user.
pub(crate) async fn run_exec(
    a: &Assignment,
    opts: &ExecOptions,
    engine: &Engine,
    sandbox: &DockerSandbox,
    ws: &WorkspaceSpec,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    match try_run_exec(a, opts, engine, sandbox, ws, sup).await {
        Ok(r) => r,
        Err(f) => sup.fail(f),
    }
}

async fn try_run_exec(
    a: &Assignment,
    opts: &ExecOptions,
    engine: &Engine,
    sandbox: &DockerSandbox,
    ws: &WorkspaceSpec,
    sup: &mut Supervisor<'_>,
) -> Result<AttemptResult, Failure> {
    let client = engine.client().await?;
    let name = workspace_name(&ws.id);
    let info = match sup.bounded(client.inspect_container(&name)).await? {
        Ok(info) => info,
        Err(e) if e.is_not_found() => {
            return Err(Error::NoWorkspaceContainer { id: ws.id.clone() }.into())
        }
        Err(e) => return Err(e.into()),
    };
    if !info.state.running || info.id.is_empty() {
        return Err(Error::WorkspaceContainerDown {
            id: ws.id.clone(),
            name,
        }
        .into());
    }
    let init_pid = info
        .state
        .pid
        .and_then(|p| i32::try_from(p).ok())
        .filter(|&p| p > 0);
    let meta = crate::workspace::meta_dir(opts, &ws.id);
    let file = format!("{}.{OUTPUTS_FILE}", a.attempt_id);
    let outputs = meta.join(&file);
    let _ = std::fs::remove_file(&outputs);
    let config = ExecConfig {
        env: env_list(a, &format!("{DROVER_MOUNT}/{file}")),
        cmd: a.argv.clone(),
        user: sandbox.user.clone(),
        working_dir: WORKSPACE_MOUNT.to_owned(),
    };
    let oom_before = init_pid.and_then(oom_kills);
    let exec_id = sup
        .bounded(client.create_exec(&name, &config))
        .await?
        .map_err(Error::CreateExec)?;
    // Not cut short by a stop: once started, the exec is supervised (and
    // stopped there at once), never left running unwatched.
    let output = tokio::time::timeout(CALL_TIMEOUT, client.start_exec(&exec_id))
        .await
        .map_err(|_| Error::StartExec(super::Error::Timeout(CALL_TIMEOUT)))?
        .map_err(Error::StartExec)?;
    let mut run = ExecRun::new(
        client.clone(),
        &exec_id,
        &info.id,
        OutputState::Reading(output),
    );
    let mut ended = sup.supervise(&mut run).await?;
    // An exec the kernel killed for the container's memory: the OOM
    // counter of the container's cgroup moved, and the agent sent no
    // SIGKILL.
    let oom = match (oom_before, init_pid.and_then(oom_kills)) {
        (Some(before), Some(after)) => after > before,
        _ => false,
    };
    let mut limit = None;
    if let Some(exit) = &mut ended.exit {
        if oom && !ended.killed && exit.code == Some(128 + libc::SIGKILL) {
            *exit = Exit::from_status(Some(i64::from(128 + libc::SIGKILL)), false, true);
            limit = sandbox.memory.map(|m| {
                (
                    LimitExceeded::Memory,
                    format!("killed: exceeded its memory limit of {m}"),
                )
            });
        }
    }
    let result = sup.finish(&ended, Some(&outputs), limit);
    let _ = std::fs::remove_file(&outputs);
    Ok(result)
}

/// How many times the kernel's OOM killer struck in the memory cgroup of
/// process `pid` (cgroup v1 `memory.oom_control`, v2 `memory.events`).
fn oom_kills(pid: i32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut file = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            file = Some(PathBuf::from(format!(
                "/sys/fs/cgroup/memory{path}/memory.oom_control"
            )));
            break;
        }
        if controllers.is_empty() {
            file = Some(PathBuf::from(format!("/sys/fs/cgroup{path}/memory.events")));
        }
    }
    let text = std::fs::read_to_string(file?).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// An exec under supervision: its output, a poll of its state, and its
/// processes on the host for signals.
struct ExecRun {
    client: Client,
    exec_id: String,
    container_id: String,
    pid: Option<i32>,
    output: OutputState,
    exit: Option<BoxFuture<Result<Exit, Error>>>,
    output_ended: Arc<tokio::sync::Notify>,
    signalled: Arc<AtomicBool>,
}

impl ExecRun {
    fn new(client: Client, exec_id: &str, container_id: &str, output: OutputState) -> ExecRun {
        let output_ended = Arc::new(tokio::sync::Notify::new());
        let signalled = Arc::new(AtomicBool::new(false));
        let exit: BoxFuture<Result<Exit, Error>> = Box::pin({
            let client = client.clone();
            let exec_id = exec_id.to_owned();
            let output_ended = output_ended.clone();
            let signalled = signalled.clone();
            async move {
                // The engine tells an exec's end only when asked: ask
                // often at first, then less, and at once when its output
                // ends (usually when it exits).
                let mut every = Duration::from_millis(20);
                loop {
                    let info = client
                        .inspect_exec(&exec_id)
                        .await
                        .map_err(Error::InspectExec)?;
                    if !info.running && info.exit_code.is_some() {
                        return Ok(Exit::from_status(
                            info.exit_code,
                            signalled.load(Ordering::Relaxed),
                            false,
                        ));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = output_ended.notified() => {}
                    }
                    every = (every * 2).min(Duration::from_secs(1));
                }
            }
        });
        ExecRun {
            client,
            exec_id: exec_id.to_owned(),
            container_id: container_id.to_owned(),
            pid: None,
            output,
            exit: Some(exit),
            output_ended,
            signalled,
        }
    }

    /// The exec's host pid, once the engine knows it.
    async fn pid(&mut self) -> Option<i32> {
        if self.pid.is_none() {
            let info = tokio::time::timeout(CALL_TIMEOUT, self.client.inspect_exec(&self.exec_id))
                .await
                .ok()?
                .ok()?;
            self.pid = info
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .filter(|&p| p > 1);
        }
        self.pid
    }
}

/// Whether an exec still runs (if the engine does not say, it may).
async fn exec_running(client: &Client, exec_id: &str) -> bool {
    match tokio::time::timeout(CALL_TIMEOUT, client.inspect_exec(exec_id)).await {
        Ok(Ok(info)) => info.running,
        _ => true,
    }
}

impl Workload for ExecRun {
    async fn next(&mut self) -> Result<Event, Error> {
        let reading = self.output.is_open();
        let waiting = self.exit.is_some();
        tokio::select! {
            ev = self.output.next(), if reading => {
                if !self.output.is_open() {
                    self.output_ended.notify_one();
                }
                Ok(ev)
            }
            exit = wait_exit(&mut self.exit), if waiting => {
                self.exit = None;
                exit.map(Event::Exited)
            }
            else => Err(Error::NothingToFollow("exec")),
        }
    }

    fn output_open(&self) -> bool {
        self.output.is_open()
    }

    async fn signal(&mut self, sig: Signal) -> Result<(), Error> {
        self.signalled.store(true, Ordering::Relaxed);
        let pid = self.pid().await;
        let tree = pid
            .map(|p| exec_tree(p, &self.container_id))
            .unwrap_or_default();
        if tree.is_empty() {
            if !exec_running(&self.client, &self.exec_id).await {
                return Ok(());
            }
            return Err(Error::ExecNotVisible { pid });
        }
        for p in tree {
            crate::process::signal_pid(p, sig);
        }
        Ok(())
    }

    async fn finish(&mut self) {
        // Like a process group, the exec's processes do not outlive it:
        // what it left behind in its session is killed.
        if let Some(pid) = self.pid().await {
            for p in exec_tree(pid, &self.container_id) {
                crate::process::signal_pid(p, Signal::Kill);
            }
        }
    }
}

/// The fields of /proc/PID/stat the tree needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub session: i32,
}

/// Reads /proc/PID/stat: `pid (comm) state ppid pgrp session …`; the
/// command may hold spaces and parentheses, so fields are counted after
/// the last ')'.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let _pgrp = fields.next()?;
    let session = fields.next()?.parse().ok()?;
    Some(ProcStat { pid, ppid, session })
}

fn proc_table() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .collect()
}

/// `root` and the processes that belong to it: its descendants, and the
/// members of its session (an exec's process leads one; orphans it left
/// keep it). Recomputed for every signal, as processes come and go.
pub(crate) fn tree_of(root: i32, table: &[ProcStat]) -> Vec<i32> {
    let mut tree: Vec<i32> = table
        .iter()
        .filter(|p| p.pid == root || p.session == root)
        .map(|p| p.pid)
        .collect();
    loop {
        let more: Vec<i32> = table
            .iter()
            .filter(|p| !tree.contains(&p.pid) && tree.contains(&p.ppid))
            .map(|p| p.pid)
            .collect();
        if more.is_empty() {
            break;
        }
        tree.extend(more);
    }
    tree
}

/// The host pids of an exec's processes, only those in its container's
/// cgroup.
fn exec_tree(root: i32, container_id: &str) -> Vec<i32> {
    tree_of(root, &proc_table())
        .into_iter()
        .filter(|&p| in_container(p, container_id))
        .collect()
}

fn in_container(pid: i32, container_id: &str) -> bool {
    !container_id.is_empty()
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.contains(container_id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_trees() {
        let stat = parse_stat("123 (my (odd) prog) S 45 67 89 0 -1 4194304").unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 123,
                ppid: 45,
                session: 89
            }
        );
        assert!(parse_stat("garbage").is_none());
        let p = |pid, ppid, session| ProcStat { pid, ppid, session };
        // 10 is the exec (a session leader); 11, 12 its children, 13 a
        // grandchild in a session of its own; 14 an orphan of its session
        // (reparented to the container's init, 2); 20 unrelated, 21 its
        // child.
        let table = [
            p(2, 1, 2),
            p(10, 1, 10),
            p(11, 10, 10),
            p(12, 10, 10),
            p(13, 12, 13),
            p(14, 2, 10),
            p(20, 2, 20),
            p(21, 20, 20),
        ];
        let mut tree = tree_of(10, &table);
        tree.sort();
        assert_eq!(tree, vec![10, 11, 12, 13, 14]);
        assert_eq!(tree_of(99, &table), Vec::<i32>::new());
        assert_eq!(tree_of(20, &table), vec![20, 21]);
    }

    #[test]
    fn only_processes_of_the_container_are_in_its_tree() {
        // This test's own process is in no container of that id.
        let me = std::process::id() as i32;
        assert!(!in_container(me, "0123456789abcdef"));
        assert!(!in_container(me, ""));
        assert!(exec_tree(me, "0123456789abcdef").is_empty());
        assert!(tree_of(me, &proc_table()).contains(&me));
    }
}
