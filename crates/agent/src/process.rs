//! Attempts as processes on the agent's machine: each in its own process
//! group, with a clean environment, and, in a process sandbox, rlimits
//! (CPU time, address space, open files, processes) and optionally an
//! unprivileged user.
//!
//! Key design decision: the limits are set in the child between fork and
//! exec (`pre_exec`), from values computed before the fork, so the hook
//! only calls `setrlimit` (async-signal-safe, no allocation); the user is
//! switched by the standard library (`Command::uid`/`gid`, which also
//! drops the supplementary groups). A CPU time limit gets a hard limit one
//! second above the soft one: SIGXCPU first, SIGKILL a second later.

use std::path::Path;
use std::process::{ExitStatus, Stdio};

use bytes::Bytes;
use drover_proto::jobs::{Assignment, AttemptResult, Stream};
use drover_proto::sandbox::{LimitExceeded, ProcessSandbox, WorkspaceSpec};
use drover_proto::workflows::OUTPUT_FILE_ENV;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::executor::{
    self, private_dir, Ended, Error, Event, ExecOptions, Exit, Failure, Refusal, Signal,
    Supervisor, Workload, OUTPUTS_FILE,
};
use crate::survivors;

/// The type `setrlimit` takes for a resource.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Resource = libc::c_int;

/// The rlimits of a process sandbox, computed before the fork.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    entries: [Option<(Resource, libc::rlimit)>; 4],
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .flatten()
                    .map(|(r, l)| (r, l.rlim_cur, l.rlim_max)),
            )
            .finish()
    }
}

impl Limits {
    /// No limits of its own: the agent's are inherited.
    pub(crate) fn none() -> Limits {
        Limits { entries: [None; 4] }
    }

    /// The limits of `p`. None is ever raised above the agent's own hard
    /// limit: the child sets them after switching users, when it could not
    /// raise a hard limit any more, and a lower limit still holds the
    /// profile's promise.
    pub(crate) fn of(p: &ProcessSandbox) -> Limits {
        let mut limits = Limits::none();
        if let Some(t) = p.cpu_time {
            let soft = t.as_secs() + u64::from(t.subsec_nanos() > 0);
            limits.entries[0] = Some(clamped(libc::RLIMIT_CPU, soft, soft + 1));
        }
        if let Some(bytes) = p.address_space {
            limits.entries[1] = Some(clamped(libc::RLIMIT_AS, bytes.0, bytes.0));
        }
        if let Some(n) = p.open_files {
            limits.entries[2] = Some(clamped(libc::RLIMIT_NOFILE, n, n));
        }
        if let Some(n) = p.processes {
            limits.entries[3] = Some(clamped(libc::RLIMIT_NPROC, n, n));
        }
        limits
    }

    fn is_empty(&self) -> bool {
        self.entries.iter().all(Option::is_none)
    }

    /// Has the child set these limits before it execs.
    #[allow(unsafe_code)]
    fn apply(self, cmd: &mut Command) {
        if self.is_empty() {
            return;
        }
        let entries = self.entries;
        // SAFETY: the hook runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed. It calls setrlimit(2),
        // which is, with values computed before the fork (the array is
        // copied into the closure), and builds an io::Error from errno,
        // which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                for (resource, limit) in entries.iter().flatten() {
                    if libc::setrlimit(*resource, limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// `soft` and `hard`, lowered to the agent's own hard limit.
#[allow(unsafe_code)]
fn clamped(resource: Resource, soft: u64, hard: u64) -> (Resource, libc::rlimit) {
    let mut current = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: getrlimit(2) writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(resource, &mut current) };
    let ceiling = if rc == 0 {
        current.rlim_max
    } else {
        libc::RLIM_INFINITY
    };
    let hard = (hard as libc::rlim_t).min(ceiling);
    let soft = (soft as libc::rlim_t).min(hard);
    (
        resource,
        libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        },
    )
}

/// Refuses a process sandbox this agent cannot honour before anything
/// runs: a user switch needs root.
pub(crate) fn check_sandbox(p: &ProcessSandbox, can_switch_users: bool) -> Result<(), Refusal> {
    match &p.user {
        Some(user) if !can_switch_users => Err(Refusal::CannotSwitchUsers {
            sandbox: p.name.clone(),
            user: user.clone(),
        }),
        _ => Ok(()),
    }
}

/// Why a sandbox's user cannot be found on this agent.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("'{0}' is not a user name or uid[:gid]")]
    Malformed(String),
    #[error("user '{0}' does not exist on this agent")]
    Unknown(String),
    /// A name with a NUL inside, which no lookup can take.
    #[error("'{0}' is not a user name")]
    NotAName(String),
    #[error("cannot look up the user: {0}")]
    Lookup(std::io::Error),
}

/// A user's ids on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves a user name (through NSS) or `uid[:gid]`. A bare uid takes the
/// group of its passwd entry, or the same number when it has none.
pub(crate) fn resolve_user(user: &str) -> Result<UserIds, UserError> {
    let number = |s: &str| s.parse::<u32>().ok();
    if let Some((u, g)) = user.split_once(':') {
        return match (number(u), number(g)) {
            (Some(uid), Some(gid)) => Ok(UserIds { uid, gid }),
            _ => Err(UserError::Malformed(user.to_owned())),
        };
    }
    if let Some(uid) = number(user) {
        let gid = passwd(Lookup::Uid(uid))?.map_or(uid, |ids| ids.gid);
        return Ok(UserIds { uid, gid });
    }
    passwd(Lookup::Name(user))?.ok_or_else(|| UserError::Unknown(user.to_owned()))
}

enum Lookup<'a> {
    Name(&'a str),
    Uid(u32),
}

/// One passwd entry through getpwnam_r/getpwuid_r, so NSS sources other
/// than /etc/passwd count too.
#[allow(unsafe_code)]
fn passwd(key: Lookup<'_>) -> Result<Option<UserIds>, UserError> {
    let name = match &key {
        Lookup::Name(n) => {
            Some(std::ffi::CString::new(*n).map_err(|_| UserError::NotAName((*n).to_owned()))?)
        }
        Lookup::Uid(_) => None,
    };
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is a NUL
        // terminated string we own, `entry` and `found` are ours to write,
        // and `buf` is writable for the length we pass. The entry's string
        // fields point into `buf`, which we do not read.
        let rc = unsafe {
            match (&key, &name) {
                (Lookup::Name(_), Some(n)) => libc::getpwnam_r(
                    n.as_ptr(),
                    entry.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                ),
                (Lookup::Uid(uid), _) => libc::getpwuid_r(
                    *uid,
                    entry.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                ),
                (Lookup::Name(_), None) => return Ok(None),
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(UserError::Lookup(std::io::Error::from_raw_os_error(rc)));
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: getpwnam_r/getpwuid_r filled `entry` since `found` is
        // not null (it points to `entry`).
        let entry = unsafe { entry.assume_init() };
        return Ok(Some(UserIds {
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        }));
    }
}

/// Runs an attempt as a process: in its own working dir, or in the
/// workspace's directory.
pub(crate) async fn run_attempt(
    a: &Assignment,
    opts: &ExecOptions,
    sandbox: Option<&ProcessSandbox>,
    workspace: Option<&WorkspaceSpec>,
    sup: &mut Supervisor<'_>,
) -> AttemptResult {
    match try_run_attempt(a, opts, sandbox, workspace, sup).await {
        Ok(result) => result,
        Err(failure) => sup.fail(failure),
    }
}

async fn try_run_attempt(
    a: &Assignment,
    opts: &ExecOptions,
    sandbox: Option<&ProcessSandbox>,
    workspace: Option<&WorkspaceSpec>,
    sup: &mut Supervisor<'_>,
) -> Result<AttemptResult, Failure> {
    let user = match sandbox.and_then(|p| p.user.clone()) {
        Some(name) => {
            let ids = tokio::task::spawn_blocking(move || resolve_user(&name))
                .await
                .map_err(|source| Error::Blocking {
                    what: "looking up the user",
                    source,
                })?
                .map_err(Refusal::User)?;
            Some(ids)
        }
        None => None,
    };
    let owner = user.map(|ids| (ids.uid, Some(ids.gid)));
    let cwd = executor::work_dir(opts, a);
    match workspace {
        Some(ws) if !cwd.is_dir() => return Err(Error::NoWorkspace { id: ws.id.clone() }.into()),
        Some(_) => {}
        None => private_dir(&cwd, owner)?,
    }
    let drover = executor::drover_dir(opts, a);
    private_dir(&drover, owner)?;
    let outputs = drover.join(OUTPUTS_FILE);
    let program = &a.argv[0];
    let mut cmd = Command::new(program);
    cmd.args(&a.argv[1..])
        .env_clear()
        .env("PATH", &opts.path)
        .envs(&a.env)
        .env(OUTPUT_FILE_ENV, &outputs)
        .current_dir(&cwd);
    if let Some(ids) = user {
        cmd.uid(ids.uid).gid(ids.gid);
    }
    let limits = sandbox.map_or_else(Limits::none, Limits::of);
    // Recorded before it runs, so that a restart after a kill of the agent
    // finds it (`survivors`): by its environment until its pid is known.
    survivors::record(
        opts,
        &survivors::Record::new(
            a,
            survivors::Work::Spawning {
                outputs: outputs.clone(),
            },
        ),
    )
    .map_err(Error::Record)?;
    let mut run = ProcessRun::spawn(cmd, limits).map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    if let Some(r) = run
        .pgid
        .and_then(|pid| survivors::Record::process(a, pid, &outputs))
    {
        if let Err(e) = survivors::record(opts, &r) {
            // The record of the spawn still finds it.
            tracing::warn!(attempt = %a.attempt_id, error = %e, "cannot record the attempt's pid");
        }
    }
    let ended = sup.supervise(&mut run).await?;
    let limit = sandbox.and_then(|p| cpu_time_exceeded(p, &ended));
    Ok(sup.finish(&ended, Some(&outputs), limit))
}

/// Whether a process died of its CPU time limit: SIGXCPU at the soft
/// limit, or SIGKILL at the hard one (that the agent did not send).
pub(crate) fn cpu_time_exceeded(
    p: &ProcessSandbox,
    ended: &Ended,
) -> Option<(LimitExceeded, String)> {
    let limit = p.cpu_time?;
    let signal = ended.exit?.signal?;
    let hit = signal == libc::SIGXCPU || (signal == libc::SIGKILL && !ended.killed);
    hit.then(|| {
        (
            LimitExceeded::CpuTime,
            format!(
                "killed: used up its CPU time limit of {}",
                humantime::format_duration(limit)
            ),
        )
    })
}

/// A process under supervision: its pipes, and its process group.
pub(crate) struct ProcessRun {
    child: Child,
    /// With `process_group(0)` the group id is the child's pid.
    pgid: Option<u32>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    exited: bool,
}

impl ProcessRun {
    /// Starts `cmd` (program, arguments, environment and working dir set)
    /// in its own process group with `limits`, its output piped.
    pub(crate) fn spawn(mut cmd: Command, limits: Limits) -> std::io::Result<ProcessRun> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        limits.apply(&mut cmd);
        let mut child = cmd.spawn()?;
        Ok(ProcessRun {
            pgid: child.id(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            out_buf: vec![0u8; 8192],
            err_buf: vec![0u8; 8192],
            exited: false,
        })
    }
}

impl Workload for ProcessRun {
    async fn next(&mut self) -> Result<Event, Error> {
        tokio::select! {
            n = read_some(&mut self.stdout, &mut self.out_buf) => Ok(match n {
                Some(n) => Event::Output(Stream::Stdout, Bytes::copy_from_slice(&self.out_buf[..n])),
                None => {
                    self.stdout = None;
                    Event::OutputClosed
                }
            }),
            n = read_some(&mut self.stderr, &mut self.err_buf) => Ok(match n {
                Some(n) => Event::Output(Stream::Stderr, Bytes::copy_from_slice(&self.err_buf[..n])),
                None => {
                    self.stderr = None;
                    Event::OutputClosed
                }
            }),
            status = self.child.wait(), if !self.exited => {
                self.exited = true;
                match status {
                    Ok(s) => Ok(Event::Exited(Exit {
                        code: s.code(),
                        signal: exit_signal(s),
                        oom_killed: false,
                    })),
                    Err(e) => {
                        // Cannot happen short of a kernel oddity; do not spin.
                        signal_group(self.pgid, Signal::Kill);
                        Err(Error::WaitProcess(e))
                    }
                }
            }
        }
    }

    fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    async fn signal(&mut self, sig: Signal) -> Result<(), Error> {
        if !signal_group(self.pgid, sig) && sig == Signal::Kill && !self.exited {
            let _ = self.child.start_kill();
        }
        Ok(())
    }

    async fn finish(&mut self) {
        // The attempt's process group does not outlive it: whatever the
        // main process left behind is killed (ESRCH when nothing is left is
        // fine).
        signal_group(self.pgid, Signal::Kill);
    }
}

fn exit_signal(s: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.signal()
}

/// Reads what is there; `None` at end of stream or on error. A missing
/// reader never completes, so a closed pipe drops out of the select.
async fn read_some<R: AsyncRead + Unpin>(r: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    let Some(reader) = r else {
        return std::future::pending().await;
    };
    match reader.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Sends a signal to every process of the group `pgid`. False when it
/// could not be sent (the group is gone).
#[allow(unsafe_code)]
pub(crate) fn signal_group(pgid: Option<u32>, sig: Signal) -> bool {
    // kill(-1) would signal every process we may signal, and kill(0) our
    // own group: only a real group id of a child is acceptable.
    let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 1) else {
        return false;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; a negative pid addresses the process group. The group id is
    // that of a child we started in its own group, checked to be > 1 above.
    let rc = unsafe { libc::kill(-pgid, sig.number()) };
    rc == 0
}

/// Sends a signal to one process. False when it could not be sent.
#[allow(unsafe_code)]
pub(crate) fn signal_pid(pid: i32, sig: Signal) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; the pid is a single process (> 1, so never a group or
    // every process).
    let rc = unsafe { libc::kill(pid, sig.number()) };
    rc == 0
}

/// Hands a directory tree to a user: every entry, symlinks themselves and
/// never their targets (the tree may hold what a sandbox wrote).
pub(crate) fn chown_tree(root: &Path, uid: u32, gid: Option<u32>) -> std::io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), gid)?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use drover_proto::jobs::Outcome;
    use drover_proto::sandbox::{ByteSize, Sandbox};

    use super::*;
    use crate::executor::{set_mode, Stop};
    use crate::test_support::{assignment, process_opts, rt, run_with};

    fn sandbox(p: ProcessSandbox) -> Option<Sandbox> {
        Some(Sandbox::Process(ProcessSandbox {
            name: "limited".into(),
            ..p
        }))
    }

    /// A state dir as `run` leaves it for sandboxes run as another user.
    fn state_dir() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        set_mode(tmp.path(), 0o711).unwrap();
        tmp
    }

    #[test]
    fn cpu_time_limit_kills_a_busy_loop() {
        let tmp = state_dir();
        let opts = process_opts(tmp.path());
        let mut a = assignment(&["sh", "-c", "while :; do :; done"]);
        a.timeout_ms = 30_000;
        a.sandbox = sandbox(ProcessSandbox {
            cpu_time: Some(Duration::from_secs(1)),
            ..ProcessSandbox::default()
        });
        let r = rt().block_on(run_with(&opts, &a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Failed, "{:?}", r.result);
        assert_eq!(r.result.limit_exceeded, Some(LimitExceeded::CpuTime));
        assert!(
            matches!(r.result.signal, Some(libc::SIGXCPU | libc::SIGKILL)),
            "{:?}",
            r.result
        );
        assert_eq!(
            r.result.error.as_deref(),
            Some("killed: used up its CPU time limit of 1s")
        );
        assert!(r.elapsed < Duration::from_secs(6), "{:?}", r.elapsed);
    }

    #[test]
    fn open_files_and_address_space_are_visible_to_the_process() {
        let tmp = state_dir();
        let opts = process_opts(tmp.path());
        let mut a = assignment(&["sh", "-c", "ulimit -n; ulimit -v"]);
        a.sandbox = sandbox(ProcessSandbox {
            open_files: Some(64),
            address_space: Some(ByteSize(512 << 20)),
            ..ProcessSandbox::default()
        });
        let r = rt().block_on(run_with(&opts, &a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r);
        // ulimit -v counts KiB.
        assert_eq!(r.stdout, "64\n524288\n");
    }

    #[test]
    fn runs_as_an_unprivileged_user_with_a_working_outputs_file() {
        let tmp = state_dir();
        let opts = process_opts(tmp.path());
        let mut a = assignment(&[
            "sh",
            "-c",
            "id -u; id -G; touch here; printf '{\"user\": \"%s\"}' \"$(id -un)\" > \"$DROVER_OUTPUT\"",
        ]);
        a.sandbox = sandbox(ProcessSandbox {
            user: Some("nobody".into()),
            ..ProcessSandbox::default()
        });
        let r = rt().block_on(run_with(&opts, &a, &Stop::new()));
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{:?}", r);
        let nobody = resolve_user("nobody").unwrap();
        // No supplementary groups are kept from the agent (root).
        assert_eq!(r.stdout, format!("{}\n{}\n", nobody.uid, nobody.gid));
        assert_eq!(
            r.result.outputs.get("user").map(String::as_str),
            Some("nobody")
        );
    }

    #[test]
    fn processes_limit_stops_a_fork_loop() {
        let tmp = state_dir();
        let opts = process_opts(tmp.path());
        let mut a = assignment(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 1 & done; wait; echo done",
        ]);
        a.sandbox = sandbox(ProcessSandbox {
            processes: Some(4),
            user: Some("nobody".into()),
            ..ProcessSandbox::default()
        });
        let r = rt().block_on(run_with(&opts, &a, &Stop::new()));
        let stderr = r.stderr.to_lowercase();
        assert!(
            stderr.contains("fork") || stderr.contains("resource temporarily unavailable"),
            "{r:?}"
        );
        assert!(r.elapsed < Duration::from_secs(8), "{:?}", r.elapsed);
    }

    #[test]
    fn refusals_name_the_reason() {
        let p = ProcessSandbox {
            name: "as-nobody".into(),
            user: Some("nobody".into()),
            ..ProcessSandbox::default()
        };
        let err = check_sandbox(&p, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sandbox 'as-nobody' runs as user 'nobody', but this agent cannot switch users: the agent is not running as root"
        );
        assert!(check_sandbox(&p, true).is_ok());
        let no_user = ProcessSandbox::default();
        assert!(check_sandbox(&no_user, false).is_ok());
    }

    #[test]
    fn users_table() {
        let nobody = resolve_user("nobody").unwrap();
        let cases: [(&str, Result<UserIds, &str>); 6] = [
            (
                "65534:65534",
                Ok(UserIds {
                    uid: 65534,
                    gid: 65534,
                }),
            ),
            ("1234:5", Ok(UserIds { uid: 1234, gid: 5 })),
            ("0", Ok(UserIds { uid: 0, gid: 0 })),
            // A uid without a passwd entry keeps its number as its group.
            (
                "4242421",
                Ok(UserIds {
                    uid: 4242421,
                    gid: 4242421,
                }),
            ),
            (
                "no-such-user-x",
                Err("user 'no-such-user-x' does not exist on this agent"),
            ),
            ("1:x", Err("'1:x' is not a user name or uid[:gid]")),
        ];
        for (user, want) in cases {
            match (resolve_user(user), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{user}"),
                (Err(got), Err(want)) => assert_eq!(got.to_string(), want, "{user}"),
                (got, want) => panic!("{user}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(resolve_user(&nobody.uid.to_string()).unwrap(), nobody);
    }

    #[test]
    fn limits_table() {
        let get = |l: &Limits, r: Resource| {
            l.entries
                .iter()
                .flatten()
                .find(|(res, _)| *res == r)
                .map(|(_, l)| (l.rlim_cur, l.rlim_max))
        };
        let l = Limits::of(&ProcessSandbox {
            cpu_time: Some(Duration::from_millis(1500)),
            address_space: Some(ByteSize(64 << 20)),
            open_files: Some(10),
            processes: Some(7),
            ..ProcessSandbox::default()
        });
        // Soft rounded up, hard a second later: SIGXCPU, then SIGKILL.
        assert_eq!(get(&l, libc::RLIMIT_CPU), Some((2, 3)));
        assert_eq!(get(&l, libc::RLIMIT_AS), Some((64 << 20, 64 << 20)));
        assert_eq!(get(&l, libc::RLIMIT_NOFILE), Some((10, 10)));
        assert_eq!(get(&l, libc::RLIMIT_NPROC), Some((7, 7)));
        assert!(Limits::of(&ProcessSandbox::default()).is_empty());
        // Never above the agent's own hard limit.
        let huge = Limits::of(&ProcessSandbox {
            open_files: Some(u64::MAX),
            ..ProcessSandbox::default()
        });
        let hard = clamped(libc::RLIMIT_NOFILE, 0, u64::MAX).1.rlim_max;
        assert_eq!(get(&huge, libc::RLIMIT_NOFILE), Some((hard, hard)));
    }

    #[test]
    fn cpu_time_exceeded_table() {
        let p = ProcessSandbox {
            cpu_time: Some(Duration::from_secs(2)),
            ..ProcessSandbox::default()
        };
        let ended = |signal: Option<i32>, code: Option<i32>, killed: bool| Ended {
            exit: Some(Exit {
                code,
                signal,
                oom_killed: false,
            }),
            killed,
        };
        let cases = [
            (ended(Some(libc::SIGXCPU), None, false), true),
            (ended(Some(libc::SIGKILL), None, false), true),
            // The agent's own SIGKILL (timeout, cancel) is not the limit.
            (ended(Some(libc::SIGKILL), None, true), false),
            (ended(Some(libc::SIGTERM), None, false), false),
            (ended(None, Some(0), false), false),
        ];
        for (e, want) in cases {
            let got = cpu_time_exceeded(&p, &e);
            assert_eq!(got.is_some(), want, "{e:?}");
            if let Some((limit, why)) = got {
                assert_eq!(limit, LimitExceeded::CpuTime);
                assert_eq!(why, "killed: used up its CPU time limit of 2s");
            }
        }
        let unlimited = ProcessSandbox::default();
        assert!(cpu_time_exceeded(&unlimited, &ended(Some(libc::SIGXCPU), None, false)).is_none());
    }
}
