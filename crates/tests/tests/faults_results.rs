//! Fault injection on real processes: a full disk under the server's
//! database, a link cut while a result waits, a late result. Each test
//! reproduces a finding of the reliability review (issue 11) and asserts
//! that nothing acknowledged is lost and a final state stays final.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_proto::jobs::{JobState, Outcome};
use drover_tests::*;
use serde_json::{json, Value};

const CATALOG: &str = r#"
actions:
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: slow-echo
    argv: ["/bin/sh", "-c", "sleep \"$1\"; echo \"done-$1\"", "sh", "{{delay}}"]
    params:
      delay: {type: integer, min: 0, max: 60}
    timeout: 60s
    retries: {max: 1, backoff: 100ms}
  - name: nap
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 60}
    timeout: 60s
"#;

/// A tmpfs of `size` mounted on a directory; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// On a fresh directory.
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut fs = Tmpfs::mount_at(dir.path(), size);
        fs._dir = Some(dir);
        fs
    }

    /// On an existing (empty) directory.
    fn mount_at(path: &Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run it as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_owned(),
            _dir: None,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the file system with one file until it is full; returns it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

async fn readyz(cluster: &Cluster) -> (u16, String) {
    let r = cluster
        .http
        .get(format!("{}/readyz", cluster.url))
        .send()
        .await
        .expect("readyz");
    let code = r.status().as_u16();
    (code, r.text().await.unwrap_or_default())
}

async fn submit(cluster: &Cluster, target: &str, message: &str) -> (u16, Value) {
    let r = cluster
        .http
        .post(format!("{}/api/v1/jobs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"action": "echo", "target": target, "params": {"message": message}}))
        .send()
        .await
        .expect("submit");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn job_status(cluster: &Cluster, id: &str) -> u16 {
    cluster
        .http
        .get(format!("{}/api/v1/jobs/{id}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .expect("get job")
        .status()
        .as_u16()
}

/// The server's SQLite database sits on a full 8 MiB tmpfs: writes fail
/// with a clear error, `/readyz` says the database cannot write and the
/// metric shows it; nothing is acknowledged that was not committed (every
/// job answered 201 exists, also after a kill -9 and restart); once space
/// is back the server recovers by itself — no restart — and the agent's
/// results reach the database.
#[tokio::test]
async fn server_on_a_full_disk_acknowledges_nothing_it_lost_and_recovers() {
    let fs = Tmpfs::mount("8m");
    let url = format!("sqlite://{}", fs.path().join("drover.db").display());
    let mut cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            database_url: Some(url),
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    let (code, _) = submit(&cluster, &agent.id, "before").await;
    assert_eq!(code, 201);

    let filler = fs.fill();
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        let (code, body) = submit(&cluster, &agent.id, &format!("full-{i}")).await;
        match code {
            201 => acknowledged.push(body["id"].as_str().expect("job id").to_owned()),
            500..=599 => {
                refused += 1;
                let text = body.to_string();
                assert!(
                    text.contains("full")
                        || text.contains("unavailable")
                        || text.contains("commit"),
                    "a clear error: {text}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
        // Every acknowledged job is there at once.
        for id in &acknowledged {
            assert_eq!(job_status(&cluster, id).await, 200, "acknowledged job {id}");
        }
    }
    eprintln!(
        "full disk: {} acknowledged, {refused} refused",
        acknowledged.len()
    );
    assert!(refused > 0, "the disk was full: some writes must fail");
    let (code, text) = readyz(&cluster).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("cannot write"), "{text}");
    let metrics = cluster.metrics().await;
    assert!(
        metrics.contains("drover_store_write_failing 1"),
        "{metrics}"
    );

    // Space comes back: the server recovers by itself.
    std::fs::remove_file(&filler).expect("free space");
    wait_for("/readyz to recover", Duration::from_secs(20), || {
        let cluster = &cluster;
        async move { (readyz(cluster).await.0 == 200).then_some(()) }
    })
    .await;
    let (code, body) = submit(&cluster, &agent.id, "after").await;
    assert_eq!(code, 201, "{body}");
    let after = body["id"].as_str().unwrap().to_owned();
    let job = cluster.wait_job(&after, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    let metrics = cluster.metrics().await;
    assert!(
        metrics.contains("drover_store_write_failing 0"),
        "{metrics}"
    );
    // Jobs acknowledged while the disk was full run too.
    for id in &acknowledged {
        let job = cluster.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    }

    // And they survive a crash.
    cluster.kill_server().await;
    cluster.start_server().await;
    for id in acknowledged.iter().chain([&after]) {
        assert_eq!(
            job_status(&cluster, id).await,
            200,
            "job {id} after restart"
        );
    }
    let log = std::fs::read_to_string(cluster.server_log(1)).unwrap_or_default();
    assert!(log.contains("the store cannot write"), "{log}");
    assert!(log.contains("the store writes again"), "{log}");
}

/// A final state stays final: the agent is cut off while its attempt
/// runs, the lease runs out and the attempt is declared lost, its retry is
/// queued; the late result (delivered when the link is back) is kept as
/// information and changes nothing. The retry runs exactly once and the
/// job ends with it.
#[tokio::test]
async fn a_late_result_never_changes_a_final_state() {
    for backend in BACKENDS {
        late_result_stays_information(backend).await;
    }
}

async fn late_result_stays_information(backend: Backend) {
    let cluster = Cluster::start_with(
        backend,
        ServerOptions {
            extra_args: vec!["--attempt-lease".into(), "2s".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions(CATALOG);
    let proxy = Proxy::start(cluster.port).await;
    let agent = cluster.agent_via(&proxy.url()).await;

    let id = cluster.submit("slow-echo", &agent.id, &["--param", "delay=3"]);
    cluster.wait_running(&id).await;
    proxy.cut();
    wait_for("the attempt to be lost", Duration::from_secs(20), || {
        let job = cluster.job(&id);
        async move {
            job.attempts
                .iter()
                .any(|a| a.state == JobState::Lost)
                .then_some(())
        }
    })
    .await;
    // Let the attempt finish on the agent while it is still cut off.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    let job = wait_for(
        "the retry to end and the late result",
        Duration::from_secs(60),
        || {
            let job = cluster.job(&id);
            async move {
                (job.state.is_final() && job.attempts.iter().any(|a| a.late_result.is_some()))
                    .then_some(job)
            }
        },
    )
    .await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(job.attempts.len(), 2, "one retry, run once: {job:#?}");
    let first = &job.attempts[0];
    assert_eq!(first.state, JobState::Lost, "{job:#?}");
    assert_eq!(first.exit_code, None);
    let late = first.late_result.as_ref().unwrap();
    assert_eq!(late.outcome, Outcome::Succeeded);
    assert_eq!(late.exit_code, Some(0));
    assert_eq!(job.attempts[1].state, JobState::Succeeded);
    assert!(job.attempts[1].late_result.is_none());
    let shown = cluster.cli_ok(&["jobs", "show", &id]);
    assert!(
        shown.contains("result arrived after the attempt was declared lost"),
        "{shown}"
    );
    // Nothing changes later either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = cluster.job(&id);
    assert_eq!(again.state, JobState::Succeeded);
    assert_eq!(again.attempts.len(), 2);
    assert_eq!(again.attempts[0].state, JobState::Lost);
}

/// The lease of a finished attempt is held until its result is
/// acknowledged: the server keeps refusing the result (503, Retry-After)
/// for several lease lengths while every other call passes; the agent
/// renews the attempt's lease all along, so the job ends succeeded with its
/// one attempt instead of being declared lost and run again.
#[tokio::test]
async fn a_finished_attempt_keeps_its_lease_while_its_result_waits() {
    for backend in BACKENDS {
        lease_held_while_result_waits(backend).await;
    }
}

async fn lease_held_while_result_waits(backend: Backend) {
    let cluster = Cluster::start_with(
        backend,
        ServerOptions {
            extra_args: vec!["--attempt-lease".into(), "2s".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions(CATALOG);
    let gate = HttpGate::start(cluster.port);
    let agent = cluster.agent_via(&gate.url()).await;

    gate.block("/result", 3);
    let id = cluster.submit("slow-echo", &agent.id, &["--param", "delay=1"]);
    let outbox = agent.state_dir().join("outbox");
    wait_for("the result in the outbox", Duration::from_secs(15), || {
        let n = std::fs::read_dir(&outbox)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0);
        async move { (n == 1).then_some(()) }
    })
    .await;
    // Four lease lengths with the result held back.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let job = cluster.job(&id);
    assert_eq!(job.state, JobState::Running, "still running: {job:#?}");
    gate.open();
    let job = cluster.wait_job(&id, Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(job.attempts.len(), 1, "{job:#?}");
    assert!(job.attempts[0].late_result.is_none(), "{job:#?}");
}

/// The agent's state dir is on a full 1 MiB tmpfs and its link is cut as
/// an attempt ends: the result can be neither written nor reported, so the
/// agent keeps it in memory and reports it once the link is back (nothing
/// dropped). While it cannot write it takes no new work and says why in
/// its heartbeat (`agents list`); once space is back it takes work again.
#[tokio::test]
async fn an_agent_on_a_full_disk_keeps_its_results_and_takes_no_work_until_it_can_write() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(CATALOG);
    let proxy = Proxy::start(cluster.port).await;
    let mut agent = AgentProc::new(&proxy.url());
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    let fs = Tmpfs::mount_at(&agent.state_dir(), "1m");
    cluster.enroll_and_start(&mut agent, &[]);
    cluster.wait_online(&agent.id).await;

    let id = cluster.submit("nap", &agent.id, &["--param", "seconds=2"]);
    cluster.wait_running(&id).await;
    let filler = fs.fill();
    proxy.cut();
    wait_for("the result kept in memory", Duration::from_secs(15), || {
        let log = agent.log();
        async move { log.contains("keeping it in memory").then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    let job = cluster.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(job.attempts.len(), 1, "{job:#?}");
    assert_eq!(job.attempts[0].exit_code, Some(0));

    // It takes no work while it cannot write, and says why.
    let agent_id = agent.id.clone();
    wait_for(
        "the problem in the heartbeat",
        Duration::from_secs(15),
        || {
            let a = cluster.agent(&agent_id);
            async move {
                a.inventory
                    .and_then(|i| i.problem)
                    .filter(|p| p.contains("cannot write results"))
            }
        },
    )
    .await;
    let list = cluster.cli_ok(&["agents", "list"]);
    assert!(
        list.contains("takes no work: cannot write results"),
        "{list}"
    );
    let queued = cluster.submit("echo", &agent.id, &["--param", "message=later"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.job(&queued).state, JobState::Queued);

    // Space is back: it takes work again.
    std::fs::remove_file(&filler).unwrap();
    let job = cluster.wait_job(&queued, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    wait_for("the problem to clear", Duration::from_secs(15), || {
        let a = cluster.agent(&agent_id);
        async move {
            a.inventory
                .is_some_and(|i| i.problem.is_none())
                .then_some(())
        }
    })
    .await;
    assert!(!agent.log().contains("it is lost"));
}
