//! Helpers shared by the executor, process, docker and workspace tests:
//! assignments, a runtime, and running one attempt to its end with every
//! output chunk collected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_proto::jobs::{Assignment, AttemptResult, LogUpload, Stream};
use drover_proto::sandbox::{DockerSandbox, Sandbox};
use tokio::sync::mpsc;

use crate::executor::{drover_dir, execute, ExecOptions, Stop};

/// An attempt of `argv` with a unique id, a 10 s timeout and a 1 s grace.
pub(crate) fn assignment(argv: &[&str]) -> Assignment {
    Assignment {
        attempt_id: format!("att-{}", fastrand::u64(..)),
        job_id: "job".into(),
        action: "test".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        timeout_ms: 10_000,
        kill_grace_ms: 1_000,
        log_cap_bytes: 1 << 20,
        lease_ms: 30_000,
        artifacts: Vec::new(),
        sandbox: None,
        workspace: None,
        mask: Vec::new(),
        seal: None,
    }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How an attempt went.
#[derive(Debug)]
pub(crate) struct Run {
    pub result: AttemptResult,
    pub stdout: String,
    pub stderr: String,
    pub chunks: Vec<LogUpload>,
    pub elapsed: Duration,
}

/// Runs `a` with `opts` to its end, `stop` being available to whoever
/// holds a clone, and collects its output.
pub(crate) async fn run_with(opts: &ExecOptions, a: &Assignment, stop: &Stop) -> Run {
    let (tx, mut rx) = mpsc::channel(10_000);
    let started = Instant::now();
    let result = execute(a, opts, stop, &tx).await;
    let elapsed = started.elapsed();
    drop(tx);
    let mut chunks = Vec::new();
    while let Some(c) = rx.recv().await {
        chunks.push(c);
    }
    let text = |s| {
        chunks
            .iter()
            .filter(|c| c.stream == s)
            .map(|c| c.data.as_str())
            .collect::<String>()
    };
    Run {
        stdout: text(Stream::Stdout),
        stderr: text(Stream::Stderr),
        result,
        chunks,
        elapsed,
    }
}

/// Runs `a` with process-only options in a state dir of its own, and
/// checks that its working dir and drover dir are gone after.
pub(crate) async fn run(a: &Assignment, stop: &Stop) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ExecOptions::new(tmp.path());
    let r = run_with(&opts, a, stop).await;
    // The working dir and the drover dir are gone.
    assert!(!opts.work_root.join(&a.attempt_id).exists());
    assert!(!drover_dir(&opts, a).exists());
    r
}

/// Runs `a` like `run_with`, and once its first output arrives applies
/// `stops` (after each delay: a forced stop when true, else a cancel), so
/// a stop finds the workload running however long it took to start.
pub(crate) async fn run_stopped_after_output(
    opts: &ExecOptions,
    a: &Assignment,
    stops: &[(Duration, bool)],
) -> Run {
    let stop = Stop::new();
    let (tx, mut rx) = mpsc::channel(10_000);
    let started = Instant::now();
    let collect = async {
        let mut chunks = Vec::new();
        let mut first = true;
        while let Some(c) = rx.recv().await {
            if first {
                first = false;
                for (after, kill) in stops {
                    stop_later(&stop, *after, *kill);
                }
            }
            chunks.push(c);
        }
        chunks
    };
    let execute = async {
        let r = execute(a, opts, &stop, &tx).await;
        drop(tx);
        r
    };
    let (result, chunks) = tokio::join!(execute, collect);
    let elapsed = started.elapsed();
    let text = |s| {
        chunks
            .iter()
            .filter(|c: &&LogUpload| c.stream == s)
            .map(|c| c.data.as_str())
            .collect::<String>()
    };
    Run {
        stdout: text(Stream::Stdout),
        stderr: text(Stream::Stderr),
        result,
        chunks,
        elapsed,
    }
}

/// Process-only options in `root`, prepared like `run` prepares them.
pub(crate) fn process_opts(root: &Path) -> ExecOptions {
    let opts = ExecOptions::new(root);
    opts.prepare().unwrap();
    opts
}

/// Stops `stop` (gracefully, or at once with `kill`) after `after`.
pub(crate) fn stop_later(stop: &Stop, after: Duration, kill: bool) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if kill {
            stop.kill();
        } else {
            stop.cancel();
        }
    });
}

/// A docker profile of busybox with `extra` fields (not run: for the
/// tests of what is made of a profile).
pub(crate) fn docker_profile(extra: serde_json::Value) -> DockerSandbox {
    let mut v = serde_json::json!({"type": "docker", "name": "d", "image": "busybox:1"});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    match serde_json::from_value::<Sandbox>(v).unwrap() {
        Sandbox::Docker(d) => d,
        Sandbox::Process(_) => unreachable!(),
    }
}
