//! Server-side schedules (issue 16, point 5) through the real CLI, server
//! and agent, on both engines: a schedule every 2 s starts jobs that run
//! on an agent, pause stops it, resume restarts it, rm removes it; bad
//! input is refused naming the field and stores nothing; overlap `skip`
//! records a skipped slot while a long job runs; `run-once` catches up
//! exactly once after downtime; and two server processes on one
//! PostgreSQL fire each slot exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use drover_tests::*;
use serde_json::Value;

const CATALOG: &str = r#"
actions:
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    timeout: 60s
"#;

fn options() -> ServerOptions {
    ServerOptions {
        extra_args: vec!["--schedule-tick".into(), "200ms".into()],
        ..ServerOptions::default()
    }
}

async fn cluster_with_agent(backend: Backend) -> (Cluster, AgentProc) {
    let cluster = Cluster::start_with(backend, options()).await;
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent)
}

fn slots(cluster: &Cluster, name: &str) -> Vec<Value> {
    let detail: Value = cluster.cli_json(&["schedules", "show", name]);
    detail["slots"].as_array().cloned().unwrap_or_default()
}

fn started(slots: &[Value]) -> Vec<&Value> {
    slots.iter().filter(|s| s["outcome"] == "started").collect()
}

async fn wait_slots(cluster: &Cluster, name: &str, what: &str, n: usize) -> Vec<Value> {
    wait_for(what, Duration::from_secs(20), || {
        let got = slots(cluster, name);
        async move { (started(&got).len() >= n).then_some(got) }
    })
    .await
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn schedules_start_jobs_and_pause_resume_and_rm() {
    for backend in BACKENDS {
        let (cluster, agent) = cluster_with_agent(backend).await;
        // Bad input is refused, naming the field; nothing is stored.
        for (args, needle) in [
            (vec!["--cron", "61 * * * *", "--action", "echo"], "cron"),
            (vec!["--cron", "* * * *", "--action", "echo"], "cron"),
            (
                vec![
                    "--cron",
                    "* * * * *",
                    "--timezone",
                    "Mars/Base",
                    "--action",
                    "echo",
                ],
                "timezone",
            ),
            (vec!["--cron", "* * * * *", "--action", "nope"], "nope"),
            (
                vec![
                    "--cron",
                    "* * * * *",
                    "--action",
                    "echo",
                    "--param",
                    "bogus=1",
                ],
                "bogus",
            ),
        ] {
            let mut full = vec!["schedules", "add", "bad"];
            full.extend(&args);
            full.extend(["--target", agent.id.as_str()]);
            if !args.contains(&"--param") {
                full.extend(["--param", "message=x"]);
            }
            let out = cluster.cli(&full);
            assert!(!out.status.success(), "{backend}: {args:?} was accepted");
            assert!(
                stderr(&out).contains(needle),
                "{backend}: {args:?}: {}",
                stderr(&out)
            );
        }
        let list: Vec<Value> = cluster.cli_json(&["schedules", "list"]);
        assert!(list.is_empty(), "{backend}: {list:?}");

        let saved: Value = cluster.cli_json(&[
            "schedules",
            "add",
            "tick",
            "--cron",
            "*/2 * * * * *",
            "--action",
            "echo",
            "--target",
            &agent.id,
            "--param",
            "message=scheduled",
        ]);
        assert_eq!(saved["kind"], "action", "{backend}: {saved}");
        assert_eq!(saved["paused"], false);
        assert!(saved["next_slot"].is_string());
        let got = wait_slots(&cluster, "tick", "two slots of tick", 2).await;
        for slot in started(&got) {
            let target = slot["target"].as_str().unwrap();
            let id = target.strip_prefix("job:").unwrap();
            let job = cluster.wait_job(id, Duration::from_secs(20)).await;
            assert_eq!(
                job.state,
                drover_proto::jobs::JobState::Succeeded,
                "{backend}"
            );
            assert_eq!(job.created_by, "admin");
        }
        // Slots are two seconds apart.
        let times: Vec<i64> = started(&got)
            .iter()
            .map(|s| {
                chrono::DateTime::parse_from_rfc3339(s["slot_at"].as_str().unwrap())
                    .unwrap()
                    .timestamp()
            })
            .collect();
        assert!(times.iter().all(|t| t % 2 == 0), "{backend}: {times:?}");
        // The audit says who started them, and that a schedule did.
        let audit: Vec<Value> = cluster.cli_json(&[
            "audit",
            "list",
            "--action",
            "job.create",
            "--actor",
            "admin",
        ]);
        assert!(
            audit.iter().any(|e| e["detail"]["schedule"] == "tick"
                && e["source"] == "schedule tick"
                && e["target"].as_str().unwrap().starts_with("job:")),
            "{backend}: {audit:?}"
        );

        // Paused: no more slots.
        let paused: Value = cluster.cli_json(&["schedules", "pause", "tick"]);
        assert_eq!(paused["paused"], true);
        assert!(paused["next_slot"].is_null());
        let before = started(&slots(&cluster, "tick")).len();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = started(&slots(&cluster, "tick")).len();
        assert!(
            after <= before + 1,
            "{backend}: {before} → {after} while paused"
        );
        let list = cluster.cli_ok(&["schedules", "list"]);
        assert!(list.contains("tick") && list.contains("paused"), "{list}");

        // Resumed: it fires again, without back-filling the paused time.
        cluster.cli_ok(&["schedules", "resume", "tick"]);
        let got = wait_slots(&cluster, "tick", "a slot after resume", after + 1).await;
        assert!(
            started(&got).len() <= after + 3,
            "{backend}: back-filled? {got:?}"
        );
        assert!(got.iter().all(|s| s["missed"] == 0), "{backend}: {got:?}");

        // Removed: gone, and it fires no more.
        cluster.cli_ok(&["schedules", "rm", "tick"]);
        let out = cluster.cli(&["schedules", "show", "tick"]);
        assert!(!out.status.success() && stderr(&out).contains("not found"));
        let list: Vec<Value> = cluster.cli_json(&["schedules", "list"]);
        assert!(list.is_empty(), "{backend}");
    }
}

#[tokio::test]
async fn overlap_skip_records_a_skipped_slot_while_a_long_job_runs() {
    for backend in BACKENDS {
        let (cluster, agent) = cluster_with_agent(backend).await;
        cluster.cli_ok(&[
            "schedules",
            "add",
            "long",
            "--cron",
            "*/2 * * * * *",
            "--action",
            "sleep",
            "--target",
            &agent.id,
            "--param",
            "seconds=5",
            "--overlap",
            "skip",
        ]);
        let got = wait_for("a skipped slot", Duration::from_secs(20), || {
            let got = slots(&cluster, "long");
            async move { got.iter().any(|s| s["outcome"] == "skipped").then_some(got) }
        })
        .await;
        let skipped = got.iter().find(|s| s["outcome"] == "skipped").unwrap();
        assert!(
            skipped["detail"].as_str().unwrap().contains("is running"),
            "{backend}: {skipped}"
        );
        assert!(skipped["target"].is_null());
        // Only one job runs at a time: the first is still running.
        assert_eq!(started(&got).len(), 1, "{backend}: {got:?}");
        let text = cluster.cli_ok(&["schedules", "show", "long"]);
        assert!(text.contains("skipped"), "{text}");
        cluster.cli_ok(&["schedules", "rm", "long"]);
    }
}

#[tokio::test]
async fn run_once_catches_up_once_after_downtime() {
    for backend in BACKENDS {
        let (mut cluster, agent) = cluster_with_agent(backend).await;
        for (name, missed) in [("catchup", "run-once"), ("forget", "skip")] {
            cluster.cli_ok(&[
                "schedules",
                "add",
                name,
                "--cron",
                "*/2 * * * * *",
                "--action",
                "echo",
                "--target",
                &agent.id,
                "--param",
                "message=hi",
                "--missed",
                missed,
                "--overlap",
                "queue",
            ]);
        }
        wait_slots(&cluster, "catchup", "a first slot", 1).await;
        wait_slots(&cluster, "forget", "a first slot", 1).await;
        let status = cluster.stop_server().await;
        assert!(status.success(), "{backend}: {status}");
        // Three slots or more pass while no server runs.
        tokio::time::sleep(Duration::from_secs(7)).await;
        cluster.start_server().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.cli_ok(&["schedules", "pause", "catchup"]);
        cluster.cli_ok(&["schedules", "pause", "forget"]);

        let caught: Vec<Value> = slots(&cluster, "catchup")
            .into_iter()
            .filter(|s| s["missed"].as_u64().unwrap() > 0)
            .collect();
        assert_eq!(caught.len(), 1, "{backend}: {caught:?}");
        assert!(
            caught[0]["missed"].as_u64().unwrap() >= 2,
            "{backend}: {caught:?}"
        );
        assert_eq!(caught[0]["outcome"], "started");
        let forgot = slots(&cluster, "forget");
        assert!(
            forgot.iter().all(|s| s["missed"] == 0),
            "{backend}: {forgot:?}"
        );
        // Each started slot has a job of its own.
        let all = started(&slots(&cluster, "catchup"))
            .iter()
            .map(|s| s["target"].as_str().unwrap().to_owned())
            .collect::<BTreeSet<_>>();
        assert_eq!(all.len(), started(&slots(&cluster, "catchup")).len());
    }
}

#[tokio::test]
async fn two_servers_fire_each_slot_exactly_once() {
    let (cluster, agent) = cluster_with_agent(Backend::Postgres).await;
    let replica = cluster.start_replica().await;
    cluster.cli_ok(&[
        "schedules",
        "add",
        "both",
        "--cron",
        "* * * * * *",
        "--action",
        "echo",
        "--target",
        &agent.id,
        "--param",
        "message=once",
        "--overlap",
        "queue",
        "--missed",
        "run-once",
    ]);
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster.cli_ok(&["schedules", "pause", "both"]);
    // Let a slot being fired when the pause came finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = slots(&cluster, "both");
    let fired = started(&got);
    assert!(fired.len() >= 5, "{got:?}");
    // No gaps: one slot a second from the first to the last.
    let mut times: Vec<i64> = fired
        .iter()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s["slot_at"].as_str().unwrap())
                .unwrap()
                .timestamp()
        })
        .collect();
    times.sort();
    for w in times.windows(2) {
        assert_eq!(w[1] - w[0], 1, "a gap or a duplicate: {times:?}");
    }
    assert!(got.iter().all(|s| s["outcome"] == "started"), "{got:?}");
    // No duplicates: one job per slot, and no job without its slot.
    let targets: BTreeSet<String> = fired
        .iter()
        .map(|s| s["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(targets.len(), fired.len());
    let jobs: Vec<Value> = cluster.cli_json(&["jobs", "list", "--limit", "1000"]);
    let echo = jobs.iter().filter(|j| j["action"] == "echo").count();
    assert_eq!(echo, fired.len(), "jobs: {jobs:?}");
    // Both processes took part (each logs the slots it fired).
    let replica_log = std::fs::read_dir(cluster.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("replica-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap_or_default();
    let main_log = std::fs::read_to_string(cluster.server_log(1)).unwrap();
    let fired_by = |log: &str| log.matches("schedule fired").count();
    assert_eq!(
        fired_by(&main_log) + fired_by(&replica_log),
        fired.len(),
        "each slot fired by one process"
    );
    drop(replica);
}

#[tokio::test]
async fn workflow_schedules_start_runs_and_overlap_cancel_replaces_the_previous_job() {
    for backend in BACKENDS {
        let (cluster, agent) = cluster_with_agent(backend).await;
        let file = cluster.dir.path().join("greet.yaml");
        std::fs::write(
            &file,
            format!(
                "name: greet\ninputs:\n  who: {{default: world}}\ntasks:\n  - id: hello\n    \
                 action: echo\n    target: {}\n    params: {{message: \"hello ${{{{ inputs.who }}}}\"}}\n",
                agent.id
            ),
        )
        .unwrap();
        // A bad input is refused naming it; nothing is stored.
        let out = cluster.cli(&[
            "schedules",
            "add",
            "greet",
            "--cron",
            "*/2 * * * * *",
            "--workflow",
            file.to_str().unwrap(),
            "--input",
            "whom=x",
        ]);
        assert!(!out.status.success(), "{backend}");
        assert!(stderr(&out).contains("whom"), "{backend}: {}", stderr(&out));
        let saved: Value = cluster.cli_json(&[
            "schedules",
            "add",
            "greet",
            "--cron",
            "*/2 * * * * *",
            "--workflow",
            file.to_str().unwrap(),
            "--input",
            "who=cron",
        ]);
        assert_eq!(saved["kind"], "workflow", "{backend}: {saved}");
        let got = wait_slots(&cluster, "greet", "a run of greet", 1).await;
        let target = started(&got)[0]["target"].as_str().unwrap().to_owned();
        let id = target.strip_prefix("run:").expect("a run").to_owned();
        let run: Value = wait_for("the run to end", Duration::from_secs(20), || {
            let run: Value = cluster.cli_json(&["workflow", "status", &id]);
            async move { (run["state"] != "running").then_some(run) }
        })
        .await;
        assert_eq!(run["state"], "succeeded", "{backend}: {run}");
        assert_eq!(run["inputs"]["who"], "cron");
        assert_eq!(run["created_by"], "admin");
        cluster.cli_ok(&["schedules", "rm", "greet"]);

        // Overlap cancel: each slot cancels the job of the one before.
        cluster.cli_ok(&[
            "schedules",
            "add",
            "restart",
            "--cron",
            "*/2 * * * * *",
            "--action",
            "sleep",
            "--target",
            &agent.id,
            "--param",
            "seconds=30",
            "--overlap",
            "cancel",
        ]);
        let got = wait_slots(&cluster, "restart", "two slots of restart", 2).await;
        cluster.cli_ok(&["schedules", "pause", "restart"]);
        let mut fired = started(&got);
        fired.sort_by_key(|s| s["slot_at"].as_str().unwrap().to_owned());
        let first = fired[0]["target"]
            .as_str()
            .unwrap()
            .strip_prefix("job:")
            .unwrap();
        let job = cluster.wait_job(first, Duration::from_secs(20)).await;
        assert_eq!(
            job.state,
            drover_proto::jobs::JobState::Cancelled,
            "{backend}"
        );
        let audit: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", "job.cancel"]);
        assert!(
            audit.iter().any(|e| e["source"] == "schedule restart"),
            "{backend}: {audit:?}"
        );
        cluster.cli_ok(&["schedules", "rm", "restart"]);
    }
}
