//! Attempts a killed agent left behind: each running attempt is recorded
//! in `<state_dir>/attempts/` while its work runs, and at
//! the next start the agent stops whatever of it survived and reports the
//! attempt `failed` ("agent restarted"), before it polls for work.
//!
//! Key design decision: kill and report, not adopt. A process attempt runs
//! in its own process group, which outlives a `kill -9` of the agent; a
//! restarted agent never saw that survivor's output, so it cannot vouch
//! for its result, and adopting it would need a supervisor per attempt
//! that outlives the agent (a shim). Instead the survivor's group is
//! killed (SIGKILL) and the attempt reported failed, so the server applies
//! the job's retry policy at once instead of waiting for the lease, and no
//! attempt runs twice at the same time.
//!
//! A record names what to stop: a process by its pid and its start time
//! (field 22 of `/proc/PID/stat`, so a pid reused by another process is
//! never signalled), a container by its name. A record written just
//! before a spawn, whose pid is not known yet, finds the attempt's
//! processes by the outputs file in their environment (`DROVER_OUTPUT`,
//! unique per attempt). A record is an empty file whose name says all
//! that (`<attempt_id>.process.<pid>.<start_ticks>`; its mtime is the
//! start), created or renamed: atomic, written on a full disk too, and
//! freeing no data block when removed. It is not fsynced: it guards
//! against the agent's death, not the machine's, which takes the
//! processes with it (the lease covers that).
//! A record is removed once the attempt's work has ended; a kill between
//! that and the result reaching the outbox leaves the attempt to its lease
//! (`lost`), with nothing running on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_proto::jobs::{Assignment, AttemptResult, Outcome};
use drover_proto::workflows::OUTPUT_FILE_ENV;

use crate::executor::{ExecOptions, Signal, OUTPUTS_FILE};
use crate::outbox::Outbox;

/// The error of a result reported for an attempt a restart stopped.
pub const RESTARTED: &str = "agent restarted: the attempt was stopped";
/// How long a killed process group may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why a record could not be kept, or a survivor not stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "process group {pgid} of attempt {attempt} is still there {KILL_WAIT:?} after SIGKILL"
    )]
    StillRunning { attempt: String, pgid: i32 },
    #[error("attempt {attempt} ran in container {name}, but Docker is off")]
    NoEngine { attempt: String, name: String },
    #[error("cannot remove container {name} of attempt {attempt}: {source}")]
    Container {
        attempt: String,
        name: String,
        source: crate::docker::Error,
    },
}

/// An attempt whose work may be running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub attempt_id: String,
    pub started_at: DateTime<Utc>,
    pub work: Work,
}

/// What runs an attempt's work, and how to find it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A process is being spawned: its pid is not known yet, its
    /// environment holds `DROVER_OUTPUT=<outputs>`.
    Spawning { outputs: PathBuf },
    /// A process leading its own group (pgid = pid), started at
    /// `start_ticks` (clock ticks after boot).
    Process {
        pid: i32,
        start_ticks: u64,
        outputs: PathBuf,
    },
    /// A container of the attempt's own.
    Container { name: String },
}

impl Record {
    pub(crate) fn new(a: &Assignment, work: Work) -> Record {
        Record {
            attempt_id: a.attempt_id.clone(),
            started_at: Utc::now(),
            work,
        }
    }

    /// A process that was just spawned (not yet waited for, so its
    /// `/proc` entry is there).
    pub(crate) fn process(a: &Assignment, pid: u32, outputs: &Path) -> Option<Record> {
        let pid = i32::try_from(pid).ok()?;
        let start_ticks = stat(pid)?.start_ticks;
        Some(Record::new(
            a,
            Work::Process {
                pid,
                start_ticks,
                outputs: outputs.to_owned(),
            },
        ))
    }

    /// The record on disk: an empty file named `<attempt_id>.spawning`,
    /// `<attempt_id>.process.<pid>.<start_ticks>` or
    /// `<attempt_id>.container`; its mtime is the start. The rest (the
    /// outputs file, the container's name) follows from the attempt id.
    fn file_name(&self) -> String {
        let id = &self.attempt_id;
        match &self.work {
            Work::Spawning { .. } => format!("{id}.spawning"),
            Work::Process {
                pid, start_ticks, ..
            } => format!("{id}.process.{pid}.{start_ticks}"),
            Work::Container { .. } => format!("{id}.container"),
        }
    }

    /// The record a file name holds, read from the right (attempt ids may
    /// hold dots).
    fn parse(opts: &ExecOptions, name: &str, started_at: DateTime<Utc>) -> Option<Record> {
        let record = |id: &str, work| {
            Some(Record {
                attempt_id: id.to_owned(),
                started_at,
                work,
            })
        };
        let outputs = |id: &str| crate::executor::drover_dir_of(opts, id).join(OUTPUTS_FILE);
        if let Some(id) = name.strip_suffix(".spawning") {
            return record(
                id,
                Work::Spawning {
                    outputs: outputs(id),
                },
            );
        }
        if let Some(id) = name.strip_suffix(".container") {
            return record(
                id,
                Work::Container {
                    name: crate::docker::attempt_container_name(id),
                },
            );
        }
        let mut parts = name.rsplitn(4, '.');
        let start_ticks = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        let id = match (parts.next()?, parts.next()?) {
            ("process", id) => id,
            _ => return None,
        };
        record(
            id,
            Work::Process {
                pid,
                start_ticks,
                outputs: outputs(id),
            },
        )
    }
}

/// Records (or updates the record of) a running attempt. The record is an
/// empty file, created or renamed (atomic either way): it takes no data
/// block, so it is kept on a full disk too, and removing it frees none
/// that a result about to be written could count on.
pub(crate) fn record(opts: &ExecOptions, r: &Record) -> Result<(), Error> {
    let path = opts.attempts_root.join(r.file_name());
    let write = || {
        let earlier = names_of(opts, &r.attempt_id)?;
        match earlier.first() {
            // The rename keeps the mtime: the start of the attempt.
            Some(old) => std::fs::rename(opts.attempts_root.join(old), &path),
            None => std::fs::File::create(&path).map(drop),
        }
    };
    let result = match write() {
        // `ExecOptions::prepare` makes the directory; made here too when
        // something removed it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&opts.attempts_root)
                .and_then(|()| crate::executor::set_mode(&opts.attempts_root, 0o700))
                .and_then(|()| write())
        }
        other => other,
    };
    result.map_err(|source| Error::Io { path, source })
}

/// The names of an attempt's records (one, short of a crash mid-way).
fn names_of(opts: &ExecOptions, attempt_id: &str) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&opts.attempts_root)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if Record::parse(opts, name, Utc::now()).is_some_and(|r| r.attempt_id == attempt_id) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Forgets an attempt whose work has ended.
pub(crate) fn forget(opts: &ExecOptions, attempt_id: &str) {
    let names = match names_of(opts, attempt_id) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(attempt = %attempt_id, error = %e, "cannot list the records of running attempts");
            return;
        }
    };
    for name in names {
        let path = opts.attempts_root.join(name);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an attempt's record");
        }
    }
}

/// The records left in the state dir, each with its file.
fn left_over(opts: &ExecOptions) -> Result<Vec<(PathBuf, Record)>, Error> {
    let io = |source| Error::Io {
        path: opts.attempts_root.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&opts.attempts_root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut records = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let started_at = entry
            .metadata()
            .and_then(|m| m.modified())
            .map_or_else(|_| Utc::now(), DateTime::<Utc>::from);
        let parsed = entry
            .file_name()
            .to_str()
            .and_then(|name| Record::parse(opts, name, started_at));
        match parsed {
            Some(r) => records.push((path, r)),
            None => {
                // Nothing to act on: say so, and do not trip over it again.
                tracing::error!(path = %path.display(), "removing a file that is no attempt record");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(records)
}

/// At start, before polling: stops the work of every attempt a killed
/// agent left recorded and writes its `failed` result to the outbox (the
/// reporter delivers it). A record whose work could not be stopped stays
/// for the next start, unreported: its lease decides. Returns how many
/// attempts were reported.
pub async fn stop_left_over(opts: &ExecOptions, outbox: &Outbox) -> Result<usize, Error> {
    let mut reported = 0;
    for (path, r) in left_over(opts)? {
        if let Err(e) = stop(opts, &r).await {
            tracing::error!(attempt = %r.attempt_id, error = %e, "cannot stop an attempt a killed agent left running");
            continue;
        }
        // A result already in the outbox is the attempt's own: keep it.
        if !outbox.contains(&r.attempt_id) {
            if let Err(e) = outbox.put(&restarted(&r, Utc::now())) {
                tracing::error!(attempt = %r.attempt_id, error = %e, "cannot write the result of a stopped attempt");
                continue;
            }
            reported += 1;
        }
        tracing::warn!(attempt = %r.attempt_id, "stopped an attempt a killed agent left running; reported failed");
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an attempt's record");
        }
    }
    Ok(reported)
}

/// The result of an attempt a restart stopped.
fn restarted(r: &Record, now: DateTime<Utc>) -> AttemptResult {
    AttemptResult {
        attempt_id: r.attempt_id.clone(),
        outcome: Outcome::Failed,
        exit_code: None,
        signal: None,
        started_at: Some(r.started_at),
        finished_at: now,
        duration_ms: u64::try_from((now - r.started_at).num_milliseconds()).unwrap_or(0),
        error: Some(RESTARTED.to_owned()),
        stdout_truncated: false,
        stderr_truncated: false,
        outputs: Default::default(),
        limit_exceeded: None,
    }
}

/// Stops what runs the attempt; Ok once nothing of it is left.
async fn stop(opts: &ExecOptions, r: &Record) -> Result<(), Error> {
    match &r.work {
        Work::Process {
            pid,
            start_ticks,
            outputs,
        } => {
            let mut groups = our_group(*pid, *start_ticks)
                .into_iter()
                .collect::<Vec<_>>();
            // Processes of the attempt that moved to groups of their own
            // (setsid, setpgid) are found by their environment.
            for g in groups_with_outputs(outputs) {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            kill_groups(&r.attempt_id, &groups).await
        }
        Work::Spawning { outputs } => {
            kill_groups(&r.attempt_id, &groups_with_outputs(outputs)).await
        }
        Work::Container { name } => {
            let Some(engine) = &opts.docker else {
                return Err(Error::NoEngine {
                    attempt: r.attempt_id.clone(),
                    name: name.clone(),
                });
            };
            engine
                .remove_container_named(name)
                .await
                .map_err(|source| Error::Container {
                    attempt: r.attempt_id.clone(),
                    name: name.clone(),
                    source,
                })
        }
    }
}

/// The group the attempt's process led, if it (or a member of it) is
/// still there. A pid now used by another process (a different start
/// time) means the group had emptied: nobody may take a pid that still
/// names a group.
fn our_group(pid: i32, start_ticks: u64) -> Option<i32> {
    match stat(pid) {
        Some(s) if s.start_ticks == start_ticks => Some(pid),
        Some(_) => None,
        None => proc_table()
            .iter()
            .any(|s| s.pgrp == pid && s.live() && s.start_ticks >= start_ticks)
            .then_some(pid),
    }
}

/// SIGKILLs each group and waits until none has a live member.
async fn kill_groups(attempt: &str, groups: &[i32]) -> Result<(), Error> {
    for &g in groups {
        crate::process::signal_group(u32::try_from(g).ok(), Signal::Kill);
    }
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    loop {
        let table = proc_table();
        let left = groups
            .iter()
            .find(|g| table.iter().any(|s| s.pgrp == **g && s.live()));
        match left {
            None => return Ok(()),
            Some(&pgid) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::StillRunning {
                    attempt: attempt.to_owned(),
                    pgid,
                })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Groups led by a process whose environment names `outputs` as its
/// outputs file: an attempt's processes, whoever they run as.
fn groups_with_outputs(outputs: &Path) -> Vec<i32> {
    let mut wanted = format!("{OUTPUT_FILE_ENV}=").into_bytes();
    wanted.extend_from_slice(outputs.as_os_str().as_encoded_bytes());
    proc_table()
        .into_iter()
        .filter(|s| s.live() && s.pgrp == s.pid)
        .filter(|s| {
            std::fs::read(format!("/proc/{}/environ", s.pid))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == wanted.as_slice()))
        })
        .map(|s| s.pid)
        .collect()
}

/// The fields of /proc/PID/stat a survivor is told by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pid: i32,
    state: char,
    pgrp: i32,
    /// Field 22: when the process started, in clock ticks after boot.
    start_ticks: u64,
}

impl Stat {
    /// Not a zombie (dead, waiting for its parent to reap it).
    fn live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses /proc/PID/stat: `pid (comm) state ppid pgrp … starttime …`; the
/// command may hold spaces and parentheses, so fields are counted after
/// the last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some(Stat {
        pid,
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn proc_table() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command};

    use super::*;
    use crate::state::StateDir;
    use crate::test_support::{assignment, process_opts, rt};

    struct Env {
        _tmp: tempfile::TempDir,
        opts: ExecOptions,
        outbox: Outbox,
    }

    fn env() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let opts = process_opts(tmp.path());
        let outbox = Outbox::open(&StateDir::open(tmp.path()).unwrap()).unwrap();
        Env {
            _tmp: tmp,
            opts,
            outbox,
        }
    }

    /// `sh -c 'sleep 30 & sleep 30'` in its own group, as an attempt runs.
    fn survivor(outputs: &Path) -> Child {
        Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .env_clear()
            .env("PATH", crate::executor::DEFAULT_PATH)
            .env(OUTPUT_FILE_ENV, outputs)
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn killed(child: &mut Child) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.signal() == Some(libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn group_alive(pgid: i32) -> bool {
        proc_table().iter().any(|s| s.pgrp == pgid && s.live())
    }

    #[test]
    fn stat_fields_table() {
        let cases = [
            (
                "42 (sleep) S 1 42 42 0 -1 4194304 90 0 0 0 0 0 0 0 20 0 1 0 12345 2191360 134 rest",
                Some(Stat { pid: 42, state: 'S', pgrp: 42, start_ticks: 12345 }),
            ),
            (
                "7 (a) b (c)) Z 1 3 3 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0",
                Some(Stat { pid: 7, state: 'Z', pgrp: 3, start_ticks: 99 }),
            ),
            ("7 (short) S 1 3", None),
            ("garbage", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_stat(text), want, "{text}");
        }
        let me = stat(std::process::id() as i32).unwrap();
        assert!(me.live() && me.start_ticks > 0);
    }

    #[test]
    fn records_are_file_names_table() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ExecOptions::new(tmp.path());
        let at = Utc::now();
        let outputs = |id: &str| crate::executor::drover_dir_of(&opts, id).join(OUTPUTS_FILE);
        let cases = [
            (
                "att-1",
                Work::Spawning {
                    outputs: outputs("att-1"),
                },
                "att-1.spawning",
            ),
            (
                "a.process.5",
                Work::Process {
                    pid: 42,
                    start_ticks: 777,
                    outputs: outputs("a.process.5"),
                },
                "a.process.5.process.42.777",
            ),
            (
                "b.spawning",
                Work::Container {
                    name: "drover-b.spawning".into(),
                },
                "b.spawning.container",
            ),
        ];
        for (id, work, name) in cases {
            let r = Record {
                attempt_id: id.into(),
                started_at: at,
                work,
            };
            assert_eq!(r.file_name(), name);
            assert_eq!(Record::parse(&opts, name, at), Some(r), "{name}");
        }
        for junk in [
            "x.json",
            "x.process.1",
            "x.process.a.2",
            ".tmp",
            "x.proc.1.2",
        ] {
            assert_eq!(Record::parse(&opts, junk, at), None, "{junk}");
        }
    }

    #[test]
    fn a_recorded_survivor_is_killed_with_its_group_and_reported_failed() {
        let env = env();
        let a = assignment(&["sleep", "30"]);
        let outputs = crate::executor::drover_dir_of(&env.opts, &a.attempt_id).join(OUTPUTS_FILE);
        let mut child = survivor(&outputs);
        let pid = child.id() as i32;
        let r = Record::process(&a, child.id(), &outputs).unwrap();
        record(&env.opts, &r).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(group_alive(pid));

        let n = rt()
            .block_on(stop_left_over(&env.opts, &env.outbox))
            .unwrap();
        assert_eq!(n, 1);
        assert!(killed(&mut child));
        assert!(!group_alive(pid), "the background sleep survived");
        let result = env.outbox.get(&a.attempt_id).unwrap().unwrap();
        assert_eq!(result.outcome, Outcome::Failed);
        assert_eq!(result.error.as_deref(), Some(RESTARTED));
        // The record's mtime is the start.
        let started = result.started_at.unwrap();
        assert!(
            (started - r.started_at).num_seconds().abs() <= 2,
            "{started} {r:?}"
        );
        assert!(left_over(&env.opts).unwrap().is_empty());
        // A second start finds nothing to do.
        let n = rt()
            .block_on(stop_left_over(&env.opts, &env.outbox))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_reused_pid_is_never_signalled() {
        let env = env();
        let a = assignment(&["sleep", "30"]);
        let outputs = env.opts.work_root.join("y.drover/outputs.json");
        // Another process now holds the recorded pid: its start differs.
        let mut other = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = other.id() as i32;
        let start_ticks = stat(pid).unwrap().start_ticks;
        let r = Record::new(
            &a,
            Work::Process {
                pid,
                start_ticks: start_ticks - 1,
                outputs,
            },
        );
        record(&env.opts, &r).unwrap();
        let n = rt()
            .block_on(stop_left_over(&env.opts, &env.outbox))
            .unwrap();
        // The attempt is reported, and the stranger lives on.
        assert_eq!(n, 1);
        assert!(other.try_wait().unwrap().is_none());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn a_process_recorded_while_spawning_is_found_by_its_environment() {
        let env = env();
        let a = assignment(&["sleep", "30"]);
        let outputs = env
            .opts
            .work_root
            .join(format!("{}.drover/outputs.json", a.attempt_id));
        let mut mine = survivor(&outputs);
        let mut other = survivor(&env.opts.work_root.join("other.drover/outputs.json"));
        let r = Record::new(&a, Work::Spawning { outputs });
        record(&env.opts, &r).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let n = rt()
            .block_on(stop_left_over(&env.opts, &env.outbox))
            .unwrap();
        assert_eq!(n, 1);
        assert!(killed(&mut mine));
        assert!(!group_alive(mine.id() as i32));
        assert!(
            other.try_wait().unwrap().is_none(),
            "another attempt was killed"
        );
        crate::process::signal_group(Some(other.id()), Signal::Kill);
        other.wait().unwrap();
    }

    #[test]
    fn a_result_already_in_the_outbox_is_kept_and_containers_need_an_engine() {
        let env = env();
        let a = assignment(&["true"]);
        let done =
            crate::executor::rejected(&a, &crate::executor::Refusal::AtCapacity { capacity: 1 });
        env.outbox.put(&done).unwrap();
        record(
            &env.opts,
            &Record::new(
                &a,
                Work::Spawning {
                    outputs: crate::executor::drover_dir_of(&env.opts, &a.attempt_id)
                        .join(OUTPUTS_FILE),
                },
            ),
        )
        .unwrap();
        let b = assignment(&["true"]);
        record(
            &env.opts,
            &Record::new(
                &b,
                Work::Container {
                    name: format!("drover-{}", b.attempt_id),
                },
            ),
        )
        .unwrap();
        let n = rt()
            .block_on(stop_left_over(&env.opts, &env.outbox))
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            env.outbox.get(&a.attempt_id).unwrap().unwrap().outcome,
            Outcome::Rejected
        );
        // Docker is off: the container's attempt waits for a start that can
        // remove it, unreported.
        assert!(!env.outbox.contains(&b.attempt_id));
        let left: Vec<String> = left_over(&env.opts)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.attempt_id)
            .collect();
        assert_eq!(left, vec![b.attempt_id]);
    }

    #[test]
    fn a_running_attempt_is_recorded_until_its_work_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = process_opts(tmp.path());
        let a = assignment(&["sleep", "1"]);
        let stop = crate::executor::Stop::new();
        let rt = rt();
        let seen = rt.block_on(async {
            let (tx, _rx) = tokio::sync::mpsc::channel(16);
            let run = crate::executor::execute(&a, &opts, &stop, &tx);
            let look = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                left_over(&opts).unwrap()
            };
            let (result, seen) = tokio::join!(run, look);
            assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
            seen
        });
        assert_eq!(seen.len(), 1, "{seen:?}");
        let (_, r) = &seen[0];
        assert_eq!(r.attempt_id, a.attempt_id);
        assert!(matches!(r.work, Work::Process { .. }), "{r:?}");
        assert!(left_over(&opts).unwrap().is_empty());
    }
}
