//! Jobs: the action catalog, dispatch by long-poll, execution with live
//! output, limits, cancellation, retries, hostile input, and nothing lost
//! when an agent or the server dies. Real processes on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};

const CATALOG: &str = r#"
actions:
  - name: echo
    description: Print a message
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    timeout: 60s
    kill_grace: 2s
  - name: fail
    argv: ["/bin/false"]
    retries: {max: 2, backoff: 100ms}
  - name: hang
    description: Two sleepers in one process group, ignoring the timeout
    argv: ["/bin/sh", "-c", "sleep 31.{{tag}} & sleep 31.{{tag}}; wait"]
    params:
      tag: {type: integer, min: 0, max: 999999}
    timeout: 1s
    kill_grace: 500ms
  - name: chatty
    argv: ["/bin/sh", "-c", "i=0; while [ $i -lt 300 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done"]
  - name: slow-echo
    argv: ["/bin/sh", "-c", "sleep \"$1\"; echo \"done-$1\"", "sh", "{{delay}}"]
    params:
      delay: {type: integer, min: 0, max: 60}
    timeout: 60s
"#;

async fn cluster_with_agent(backend: Backend, options: ServerOptions) -> (Cluster, AgentProc) {
    let cluster = Cluster::start_with(backend, options).await;
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&["--label", "role=web"]).await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent)
}

/// `drover run echo --param message='hi; rm -rf /' --follow` prints the
/// literal text; shell syntax in parameters is never interpreted.
#[tokio::test]
async fn hostile_parameters_arrive_as_literal_argv() {
    for backend in BACKENDS {
        let (cluster, agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        for message in [
            "hi; rm -rf /",
            "$(id)",
            "`id`",
            "a\nb",
            "'; DROP TABLE jobs; --",
            "*",
        ] {
            let param = format!("message={message}");
            let out = cluster.cli(&[
                "run", "echo", "--target", &agent.id, "--param", &param, "--follow",
            ]);
            assert!(
                out.status.success(),
                "{backend} {message:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{message}\n"),
                "{backend}"
            );
        }
        let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
        assert_eq!(jobs.len(), 6);
        assert!(jobs.iter().all(|j| j.state == JobState::Succeeded));
        // Newest first: the oldest is the first message.
        let first = &jobs[5].id;
        let shown = cluster.job(first);
        assert_eq!(shown.attempts.len(), 1);
        assert_eq!(shown.attempts[0].exit_code, Some(0));
        assert!(shown.attempts[0].duration_ms.is_some());
        let logs = cluster.cli_ok(&["jobs", "logs", first]);
        assert_eq!(logs, "hi; rm -rf /\n");
    }
}

/// Unknown actions, parameters, wrong types, out-of-range values, NUL
/// bytes and selectors that match nothing are refused with a message
/// naming what is wrong, and no job is created.
#[tokio::test]
async fn bad_job_requests_are_refused_and_change_nothing() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let refuse = |args: &[&str], want: &str| {
        let out = cluster.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    refuse(
        &["run", "nope", "--target", &agent.id],
        "unknown action 'nope'",
    );
    refuse(
        &[
            "run",
            "echo",
            "--target",
            &agent.id,
            "--param",
            "colour=red",
            "--param",
            "message=x",
        ],
        "unknown parameter 'colour'",
    );
    refuse(
        &["run", "echo", "--target", &agent.id],
        "missing parameter 'message'",
    );
    refuse(
        &[
            "run",
            "sleep",
            "--target",
            &agent.id,
            "--param",
            "seconds=601",
        ],
        "allowed range is 0..=600",
    );
    refuse(
        &[
            "run",
            "sleep",
            "--target",
            &agent.id,
            "--param",
            "seconds=1;reboot",
        ],
        "parameter 'seconds' must be an integer",
    );
    refuse(
        &[
            "run",
            "echo",
            "--target",
            "role=nothing",
            "--param",
            "message=x",
        ],
        "matches no agent",
    );
    refuse(
        &[
            "run",
            "echo",
            "--target",
            "group:none",
            "--param",
            "message=x",
        ],
        "matches no agent",
    );
    refuse(
        &[
            "run",
            "echo",
            "--target",
            "role=$(id)",
            "--param",
            "message=x",
        ],
        "invalid value",
    );
    let long = format!("message={}", "x".repeat(201));
    refuse(
        &["run", "echo", "--target", &agent.id, "--param", &long],
        "at most 200 allowed",
    );

    let resp = cluster
        .http
        .post(format!("{}/api/v1/jobs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"action": "echo", "target": agent.id, "params": {"message": "a\u{0}b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("NUL"),
        "{body}"
    );

    // A free-text parameter inside shell code is refused: it would be code.
    let path = cluster.dir.path().join("shell.yaml");
    std::fs::write(
        &path,
        "actions:\n  - name: greet\n    argv: [\"/bin/sh\", \"-c\", \"echo hello {{who}}\"]\n    params: {who: {type: string}}\n",
    )
    .unwrap();
    refuse(
        &["actions", "apply", "-f", path.to_str().unwrap()],
        "would be run as code",
    );

    // A catalog with a mistake is refused whole, naming the action and field.
    let path = cluster.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "actions:\n  - name: x\n    argv: [\"/bin/echo\", \"{{who}}\"]\n",
    )
    .unwrap();
    refuse(
        &["actions", "apply", "-f", path.to_str().unwrap()],
        "argv[1]: refers to undeclared parameter 'who'",
    );
    std::fs::write(
        &path,
        "actions:\n  - name: x\n    argv: [\"/bin/true\"]\n    timout: 5s\n",
    )
    .unwrap();
    refuse(
        &["actions", "apply", "-f", path.to_str().unwrap()],
        "timout",
    );

    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    assert!(jobs.is_empty(), "{jobs:?}");
}

/// A label selector fans out into one attempt per matching agent; `--wait`
/// exits 0 on success and 4 on failure; failures are retried with backoff
/// and every attempt is visible.
#[tokio::test]
async fn fan_out_wait_and_retries() {
    let (cluster, web1) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let web2 = cluster
        .enroll_agent(&["--label", "role=web", "--group", "eu"])
        .await;
    let db = cluster
        .enroll_agent(&["--label", "role=db", "--group", "eu"])
        .await;
    cluster.wait_online(&web2.id).await;
    cluster.wait_online(&db.id).await;

    let out = cluster.cli(&[
        "run",
        "echo",
        "--target",
        "role=web",
        "--param",
        "message=fan",
        "--wait",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Job = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    let mut agents: Vec<&str> = job.attempts.iter().map(|a| a.agent_id.as_str()).collect();
    agents.sort();
    let mut want = vec![web1.id.as_str(), web2.id.as_str()];
    want.sort();
    assert_eq!(agents, want);

    let job: Job = serde_json::from_slice(
        &cluster
            .cli(&[
                "run",
                "echo",
                "--target",
                "group:eu",
                "--param",
                "message=g",
                "--wait",
                "-o",
                "json",
            ])
            .stdout,
    )
    .unwrap();
    assert_eq!(job.attempts.len(), 2);

    let out = cluster.cli(&[
        "run", "fail", "--target", &db.id, "--wait", "--output", "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Job = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job.state, JobState::Failed);
    let numbers: Vec<u32> = job.attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2, 3], "{job:?}");
    assert!(job
        .attempts
        .iter()
        .all(|a| a.state == JobState::Failed && a.exit_code == Some(1)));
    // Backoff: the retries did not start at once.
    let gap = job.attempts[1].not_before - job.attempts[0].finished_at.unwrap();
    assert!(gap.num_milliseconds() >= 40, "{gap:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failed") && stderr.contains("exit code 1"),
        "{stderr}"
    );
}

/// The agent's own allow-list wins over whatever the server sends.
#[tokio::test]
async fn agent_refuses_actions_outside_its_allow_list() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(CATALOG);
    let agent = cluster
        .enroll_agent_with(&[], "allow_actions: [\"echo\", \"sl*p\"]\n")
        .await;
    cluster.wait_online(&agent.id).await;
    let out = cluster.cli(&["run", "fail", "--target", &agent.id, "--wait", "-o", "json"]);
    assert_eq!(out.status.code(), Some(4));
    let job: Job = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job.state, JobState::Rejected);
    assert_eq!(job.attempts.len(), 1, "rejections are not retried");
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("allow-list") && error.contains("fail"),
        "{error}"
    );
    let ok = cluster.cli(&[
        "run",
        "sleep",
        "--target",
        &agent.id,
        "--param",
        "seconds=0",
        "--wait",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

fn pgrep(pattern: &str) -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A timeout kills the whole process group (SIGTERM, then SIGKILL after the
/// kill grace), and the attempt is recorded as timed out.
#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let tag = format!("{}", std::process::id() % 1_000_000);
    let pattern = format!("sleep 31.{tag}");
    let started = Instant::now();
    let out = cluster.cli(&[
        "run",
        "hang",
        "--target",
        &agent.id,
        "--param",
        &format!("tag={tag}"),
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let job: Job = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job.state, JobState::TimedOut, "{job:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    wait_for("the sleepers to be gone", Duration::from_secs(5), || {
        let n = pgrep(&pattern);
        async move { (n == 0).then_some(()) }
    })
    .await;
}

/// A cancel reaches the agent within one long-poll round trip.
#[tokio::test]
async fn cancel_reaches_the_agent_within_a_second() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let id = cluster.submit("sleep", &agent.id, &["--param", "seconds=300"]);
    cluster.wait_running(&id).await;
    let reason = cluster.job(&id).reason.unwrap_or_default();
    assert!(reason.contains("running on agent"), "{reason}");
    let asked = Instant::now();
    cluster.cli_ok(&["jobs", "cancel", &id]);
    let job = cluster.wait_job(&id, Duration::from_secs(10)).await;
    let took = asked.elapsed();
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    assert!(took < Duration::from_millis(1500), "cancel took {took:?}");
    assert_eq!(job.attempts[0].signal, Some(15), "{job:?}");
}

/// Output is capped per stream with a truncation marker.
#[tokio::test]
async fn output_is_capped_with_a_marker() {
    let (cluster, agent) = cluster_with_agent(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--log-cap-bytes".into(), "2048".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let out = cluster.cli(&["run", "chatty", "--target", &agent.id, "--follow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("line-0-"), "{text}");
    assert!(text.len() <= 2048 + 200, "{} bytes", text.len());
    assert!(text.contains("truncated"), "{text}");
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    let job = cluster.job(&jobs[0].id);
    assert!(job.attempts[0].stdout_truncated && !job.attempts[0].stderr_truncated);
}

/// Jobs waiting on an offline agent say so.
#[tokio::test]
async fn waiting_jobs_say_why() {
    let (cluster, mut agent) = cluster_with_agent(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec![
                "--stale-after".into(),
                "2s".into(),
                "--offline-after".into(),
                "3s".into(),
            ],
            ..ServerOptions::default()
        },
    )
    .await;
    agent.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let id = cluster.submit("echo", &agent.id, &["--param", "message=later"]);
    let job = cluster.job(&id);
    assert_eq!(job.state, JobState::Queued);
    let reason = job.reason.unwrap_or_default();
    assert!(reason.contains("is offline"), "{reason}");
    agent.start();
    let job = cluster.wait_job(&id, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Succeeded);
}

/// kill -9 of the agent mid-run and a restart: the agent stops the
/// attempt's survivor and reports it failed ("agent restarted"), and the
/// retry succeeds. Every attempt has one result (see also `faults.rs`).
#[tokio::test]
async fn agent_killed_mid_run_fails_the_attempt_and_retries() {
    let (cluster, mut agent) = cluster_with_agent(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--attempt-lease".into(), "2s".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let id = cluster.submit(
        "slow-echo",
        &agent.id,
        &["--param", "delay=2", "--retries", "1"],
    );
    cluster.wait_running(&id).await;
    agent.kill();
    agent.start();
    let job = cluster.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    let states: Vec<JobState> = job.attempts.iter().map(|a| a.state).collect();
    assert_eq!(states, [JobState::Failed, JobState::Succeeded], "{job:#?}");
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("agent restarted"), "{error}");
    let logs = cluster.cli_ok(&["jobs", "logs", &id]);
    assert_eq!(logs.matches("done-2").count(), 1, "{logs}");
}

/// The server is killed while an agent finishes work: the agent keeps the
/// result in its outbox and delivers it after the restart, once.
#[tokio::test]
async fn results_survive_a_server_crash() {
    for backend in BACKENDS {
        let (mut cluster, agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        let id = cluster.submit("slow-echo", &agent.id, &["--param", "delay=2"]);
        cluster.wait_running(&id).await;
        cluster.kill_server().await;
        // The job ends while the server is down; its result waits on disk.
        let outbox = agent.state_dir().join("outbox");
        wait_for("the result in the outbox", Duration::from_secs(15), || {
            let n = std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0);
            async move { (n > 0).then_some(()) }
        })
        .await;
        cluster.start_server().await;
        cluster.admin_token = cluster.login(ADMIN_PASSWORD).await.unwrap();
        let job = cluster.wait_job(&id, Duration::from_secs(30)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:#?}");
        assert_eq!(job.attempts.len(), 1, "{job:#?}");
        wait_for("the outbox to empty", Duration::from_secs(15), || {
            let n = std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0);
            async move { (n == 0).then_some(()) }
        })
        .await;
    }
}

async fn enroll_raw(cluster: &Cluster) -> (String, String) {
    let token = cluster.bootstrap_token(&[]);
    let resp: Value = cluster
        .http
        .post(format!("{}/api/v1/agent/enroll", cluster.url))
        .json(&json!({"token": token, "hostname": "raw", "agent_version": "0.1.0"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        resp["agent_id"].as_str().unwrap().to_owned(),
        resp["credentials"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

/// Agent A cannot report a result, output or lease for agent B's attempt:
/// 403, and nothing changes. A repeated result is acknowledged, not stored
/// twice. Oversized chunks are refused.
#[tokio::test]
async fn agents_touch_only_their_own_attempts() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(CATALOG);
    let (a_id, a_token) = enroll_raw(&cluster).await;
    let (_b_id, b_token) = enroll_raw(&cluster).await;
    let job_id = cluster.submit("echo", &a_id, &["--param", "message=mine"]);
    let http = &cluster.http;
    let api = |p: &str| format!("{}/api/v1{p}", cluster.url);

    let poll: Value = http
        .post(api("/agent/poll"))
        .bearer_auth(&a_token)
        .json(&json!({"free_slots": 1, "wait_ms": 1000, "capacity": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let assignment = &poll["assignments"][0];
    assert_eq!(assignment["argv"], json!(["/bin/echo", "mine"]), "{poll}");
    let attempt = assignment["attempt_id"].as_str().unwrap().to_owned();

    let result = json!({
        "attempt_id": attempt, "outcome": "succeeded", "exit_code": 0, "signal": null,
        "started_at": null, "finished_at": chrono::Utc::now(), "duration_ms": 1, "error": null,
        "stdout_truncated": false, "stderr_truncated": false
    });
    let post = |token: &str, path: String, body: Value| {
        let req = http.post(api(&path)).bearer_auth(token).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let report = |body: Value| {
        let req = http
            .post(api(&format!("/agent/attempts/{attempt}/result")))
            .bearer_auth(&a_token)
            .json(&body);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let log = json!({"stream": "stdout", "seq": 0, "data": "forged\n"});
    assert_eq!(
        post(
            &b_token,
            format!("/agent/attempts/{attempt}/result"),
            result.clone()
        )
        .await,
        403
    );
    assert_eq!(
        post(
            &b_token,
            format!("/agent/attempts/{attempt}/logs"),
            log.clone()
        )
        .await,
        403
    );
    assert_eq!(
        post(
            &b_token,
            "/agent/leases".into(),
            json!({"attempt_ids": [attempt]})
        )
        .await,
        403
    );
    assert_eq!(
        post(
            &b_token,
            format!("/agent/attempts/{attempt}/start"),
            json!({"started_at": chrono::Utc::now()})
        )
        .await,
        403
    );
    assert_eq!(cluster.job(&job_id).state, JobState::Dispatched);
    assert!(cluster.cli_ok(&["jobs", "logs", &job_id]).is_empty());

    let big = json!({"stream": "stdout", "seq": 1, "data": "x".repeat(70 * 1024)});
    assert_eq!(
        post(&a_token, format!("/agent/attempts/{attempt}/logs"), big).await,
        413
    );
    assert_eq!(
        post(
            &a_token,
            format!("/agent/attempts/{attempt}/logs"),
            log.clone()
        )
        .await,
        200
    );
    assert_eq!(
        post(&a_token, format!("/agent/attempts/{attempt}/logs"), log).await,
        200
    );
    assert_eq!(
        cluster.cli_ok(&["jobs", "logs", &job_id]),
        "forged\n",
        "a resent chunk is stored once"
    );

    let ack = report(result.clone()).await;
    assert_eq!(ack, json!({"recorded": true}));
    let again = report(result.clone()).await;
    assert_eq!(again, json!({"recorded": false}));
    let job = cluster.job(&job_id);
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts.len(), 1);
}

/// State-changing calls are in the audit log with who, what and outcome;
/// job metrics are exported and valid for promtool.
#[tokio::test]
async fn audit_log_and_job_metrics() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    cluster.cli_ok(&[
        "run",
        "echo",
        "--target",
        &agent.id,
        "--param",
        "message=x",
        "--wait",
    ]);
    let refused = cluster.cli(&["run", "nope", "--target", &agent.id]);
    assert!(!refused.status.success());
    let entries: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", "jobs"]);
    let all: Vec<Value> = cluster.cli_json(&["audit", "list"]);
    assert_eq!(entries.len(), 2, "{entries:#?}\nall: {all:#?}");
    assert_eq!(entries[0]["outcome"], json!("refused"));
    assert_eq!(entries[0]["status"], json!(422));
    assert_eq!(entries[1]["actor"], json!("admin"));
    // What was done to what (issue 14, point 9), and the call behind it.
    assert_eq!(entries[1]["action"], json!("job.create"));
    assert_eq!(entries[1]["request"], json!("POST /api/v1/jobs"));
    assert!(
        entries[1]["target"].as_str().unwrap().starts_with("job:"),
        "{entries:#?}"
    );
    assert_eq!(entries[1]["detail"]["action"], json!("echo"));
    assert_eq!(entries[1]["detail"]["selector"], json!(agent.id));
    assert_eq!(entries[0]["detail"]["action"], json!("nope"));
    for action in ["action.apply", "token.create", "agent.enroll", "user.login"] {
        assert!(
            all.iter().any(|e| e["action"] == json!(action)),
            "{action} missing: {all:#?}"
        );
    }

    let text = cluster.metrics().await;
    assert!(
        text.contains("drover_jobs{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("drover_dispatch_latency_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("drover_queue_depth 0"), "{text}");
    assert!(text.contains("drover_long_polls_waiting "), "{text}");
    promtool_check(&text);
}

/// The agent is cut off from the server for two minutes (its connections
/// dropped, new ones refused) while it finishes a job: the attempt's lease
/// runs out and it is marked lost, but the agent keeps the result in its
/// outbox and delivers it when the network is back. A final state stays
/// final: the job stays lost, and the late result is kept beside the
/// attempt (its exit code and output visible, counted nowhere).
#[tokio::test]
async fn agent_cut_off_for_minutes_delivers_its_result() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--attempt-lease".into(), "10s".into()],
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
    // The server gives the attempt up when its lease runs out.
    wait_for("the attempt to be lost", Duration::from_secs(30), || {
        let job = cluster.job(&id);
        async move { (job.state == JobState::Lost).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(agent.status()["last_error"].is_string());

    proxy.restore();
    let job = wait_for("the late result", Duration::from_secs(30), || {
        let job = cluster.job(&id);
        async move { job.attempts[0].late_result.is_some().then_some(job) }
    })
    .await;
    assert_eq!(job.state, JobState::Lost, "{job:#?}");
    assert_eq!(job.attempts.len(), 1, "{job:#?}");
    assert_eq!(job.attempts[0].state, JobState::Lost);
    assert_eq!(job.attempts[0].exit_code, None);
    let late = job.attempts[0].late_result.as_ref().unwrap();
    assert_eq!(late.outcome, drover_proto::jobs::Outcome::Succeeded);
    assert_eq!(late.exit_code, Some(0));
    assert_eq!(cluster.cli_ok(&["jobs", "logs", &id]), "done-3\n");
    let shown = cluster.cli_ok(&["jobs", "show", &id]);
    assert!(
        shown
            .contains("result arrived after the attempt was declared lost: succeeded, exit code 0"),
        "{shown}"
    );
    // Delivered once: the agent's outbox is empty again.
    wait_for("an empty outbox", Duration::from_secs(10), || {
        let n = std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(1);
        async move { (n == 0).then_some(()) }
    })
    .await;
    let metrics = cluster.metrics().await;
    assert!(
        !metrics.contains("drover_attempt_results_total{state=\"succeeded\"} 1"),
        "a late result is counted nowhere: {metrics}"
    );
}

fn poll_503s(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("drover_http_requests_total{")
                && l.contains("route=\"/api/v1/agent/poll\",status=\"503\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Past its long-poll limit the server answers 503 with Retry-After; the
/// shed agent waits as told (with jitter) instead of hammering, stays
/// online, and gets its work once the load drops.
#[tokio::test]
async fn overloaded_server_sheds_polls_and_agents_back_off() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--max-long-polls".into(), "1".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions(CATALOG);
    let mut holder = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&holder.id).await;
    // Let the first agent's long-poll take the only slot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shed = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&shed.id).await;
    let metrics = || async { cluster.metrics().await };
    let first = wait_for("a poll to be shed", Duration::from_secs(10), || async {
        let n = poll_503s(&metrics().await);
        (n > 0).then_some(n)
    })
    .await;
    let id = cluster.submit("echo", &shed.id, &["--param", "message=late"]);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = poll_503s(&metrics().await);
    // Retry-After is 2-5 s: in 10 s at most ~5 more tries, not hundreds.
    assert!(after - first <= 6, "{} polls shed in 10 s", after - first);
    assert_eq!(cluster.agent(&shed.id).status, AgentStatus::Online);
    assert_eq!(cluster.job(&id).state, JobState::Queued);

    holder.stop().await;
    let job = cluster.wait_job(&id, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
}

/// The agent's own metrics endpoint (off by default) counts attempts and is
/// valid for promtool.
#[tokio::test]
async fn agent_metrics_are_valid_for_promtool() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(CATALOG);
    let port = free_port();
    let yaml = format!("allow_actions: [\"*\"]\nmetrics_listen: 127.0.0.1:{port}\n");
    let agent = cluster.enroll_agent_with(&[], &yaml).await;
    cluster.wait_online(&agent.id).await;
    cluster.cli_ok(&[
        "run",
        "echo",
        "--target",
        &agent.id,
        "--param",
        "message=m",
        "--wait",
    ]);
    let _ = cluster.cli(&[
        "run",
        "fail",
        "--target",
        &agent.id,
        "--retries",
        "0",
        "--wait",
    ]);
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("_total"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("outbox") && !l.starts_with('#')),
        "{text}"
    );
    promtool_check(&text);
}

/// Two servers on one PostgreSQL: a job submitted to one wakes the
/// long-poll the agent holds on the other within moments (LISTEN/NOTIFY),
/// and a wait on the first answers as soon as the other records the
/// result. Without the notification the poll would sleep out its wait.
#[tokio::test]
async fn a_job_on_one_replica_wakes_a_poll_held_by_another() {
    let (cluster, agent) = cluster_with_agent(Backend::Postgres, ServerOptions::default()).await;
    let replica = cluster.start_replica().await;
    // Let the agent's current long-poll settle on the first server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = &cluster.http;
    for round in 0..5 {
        let started = Instant::now();
        let created: Value = http
            .post(format!("{}/api/v1/jobs", replica.url))
            .bearer_auth(&cluster.admin_token)
            .json(&json!({"action": "echo", "target": agent.id, "params": {"message": format!("r{round}")}}))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let job: Value = http
            .get(format!("{}/api/v1/jobs/{id}?wait_ms=20000", replica.url))
            .bearer_auth(&cluster.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(job["state"], "succeeded", "round {round}: {job}");
        assert!(
            took < Duration::from_secs(3),
            "round {round}: submit on the replica to result took {took:?}; the poll held by the other server was not woken"
        );
    }
}
