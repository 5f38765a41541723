//! Durable workflows with real processes on loopback: definitions refused
//! with their line, outputs flowing between tasks, artifacts through a
//! local directory and a real S3-compatible server, cancel, timeouts,
//! optional tasks, signed webhooks with retries, event streams resumed by
//! id, and runs that survive the server being killed again and again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_proto::workflows::{Artifact, Run, RunEvent, RunState, TaskState, WebhookDelivery};
use drover_tests::*;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

const CATALOG: &str = r#"
actions:
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 500}
    timeout: 10s
  - name: set-output
    argv: ["/usr/bin/printf", "::set-output %s=%s\n", "{{name}}", "{{value}}"]
    params:
      name: {type: string, pattern: "[A-Za-z_][A-Za-z0-9_-]*"}
      value: {type: string, max_length: 1000}
  - name: write-file
    argv: ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && printf "%s\n" "$2" > "$1"', "sh", "{{path}}", "{{content}}"]
    params:
      path: {type: string, pattern: "[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*"}
      content: {type: string, max_length: 10000}
  - name: random-file
    argv: ["/bin/sh", "-c", 'head -c "$1" /dev/urandom > "$2"', "sh", "{{bytes}}", "{{path}}"]
    params:
      bytes: {type: integer, min: 1, max: 50000000}
      path: {type: string, pattern: "[A-Za-z0-9_.-]+"}
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: string, pattern: "[0-9]+(\\.[0-9]+)?"}
    timeout: 120s
    kill_grace: 2s
  - name: fail
    argv: ["/bin/false"]
  - name: fail-retried
    description: Fails every time; the action asks for two retries
    argv: ["/bin/false"]
    retries: {max: 2, backoff: 100ms}
  - name: fail-once
    description: Fails every time; the action asks for no retry
    argv: ["/bin/false"]
    retries: {max: 0, backoff: 100ms}
  - name: sleep-briefly
    description: A sleep whose action allows one second
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: string, pattern: "[0-9]+(\\.[0-9]+)?"}
    timeout: 1s
    kill_grace: 500ms
  - name: tick
    description: Three lines of output, a little apart
    argv: ["/bin/sh", "-c", 'for i in 1 2 3; do echo "$1-$i"; sleep 0.2; done', "sh", "{{tag}}"]
    params:
      tag: {type: string, pattern: "[a-z0-9-]+"}
"#;

const DIAMOND: &str = include_str!("../../../examples/diamond.yaml");

async fn cluster_with_agent(backend: Backend, options: ServerOptions) -> (Cluster, AgentProc) {
    let cluster = Cluster::start_with(backend, options).await;
    cluster.apply_actions(CATALOG);
    let agent = cluster
        .enroll_agent(&["--label", "role=ci", "--group", "local"])
        .await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent)
}

fn write(cluster: &Cluster, name: &str, text: &str) -> String {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn submit(cluster: &Cluster, yaml: &str, inputs: serde_json::Value) -> Run {
    let resp = cluster
        .http
        .post(format!("{}/api/v1/workflows/runs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"definition": yaml, "inputs": inputs}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status.as_u16(), 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn get_run(cluster: &Cluster, id: &str) -> Option<Run> {
    let resp = cluster
        .http
        .get(format!("{}/api/v1/workflows/runs/{id}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .ok()?;
    resp.status().is_success().then_some(())?;
    resp.json().await.ok()
}

async fn wait_run(cluster: &Cluster, id: &str, timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    loop {
        let run = get_run(cluster, id).await;
        if let Some(r) = run.as_ref().filter(|r| r.state.is_final()) {
            return r.clone();
        }
        if Instant::now() > deadline {
            let waiting: Vec<String> = run
                .iter()
                .flat_map(|r| r.tasks.iter())
                .filter(|t| !t.state.is_final())
                .map(|t| format!("{} {} {:?}", t.id, t.state.as_str(), t.reason))
                .collect();
            let mut jobs = Vec::new();
            for t in run.iter().flat_map(|r| r.tasks.iter()) {
                if let (false, Some(job)) = (t.state.is_final(), &t.job_id) {
                    jobs.push(cluster.cli_ok(&["jobs", "show", job, "--output", "json"]));
                }
            }
            panic!(
                "{} run {id} did not end within {timeout:?}; not final: {waiting:#?}\n{}",
                cluster.backend,
                jobs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn task<'a>(run: &'a Run, id: &str) -> &'a drover_proto::workflows::TaskRun {
    run.tasks.iter().find(|t| t.id == id).expect("task")
}

/// `drover workflow submit -f examples/diamond.yaml --follow` runs the
/// diamond live; outputs flow downstream; the artifact comes back intact.
#[tokio::test]
async fn diamond_runs_live_with_outputs_and_artifacts() {
    for backend in BACKENDS {
        let (cluster, _agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        let file = write(&cluster, "diamond.yaml", DIAMOND);
        let out = cluster.cli(&[
            "workflow",
            "submit",
            "-f",
            &file,
            "--input",
            "version=2.0; rm -rf /",
            "--follow",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Live lines: task states in order, output lines of each task.
        for want in [
            "task build",
            "[build] ::set-output image=app:2.0; rm -rf /",
            "[test-unit] unit tests pass for app:2.0; rm -rf /",
            "[publish] published app:2.0; rm -rf /",
            "run                   succeeded",
        ] {
            assert!(
                stdout.contains(want),
                "{backend}: missing {want:?} in\n{stdout}"
            );
        }
        let runs: Vec<Run> = cluster.cli_json(&["workflow", "list"]);
        let run = wait_run(&cluster, &runs[0].id, Duration::from_secs(10)).await;
        assert_eq!(run.state, RunState::Succeeded);
        assert_eq!(
            task(&run, "build").outputs,
            BTreeMap::from([("image".to_owned(), "app:2.0; rm -rf /".to_owned())])
        );
        // One job per task.
        let jobs: BTreeSet<_> = run
            .tasks
            .iter()
            .map(|t| t.job_id.clone().unwrap())
            .collect();
        assert_eq!(jobs.len(), 4);

        let result: serde_json::Value = cluster.cli_json(&["workflow", "result", &run.id]);
        assert_eq!(result["outputs"]["build"]["image"], "app:2.0; rm -rf /");

        let dl = cluster.dir.path().join("download");
        let list: Vec<Artifact> = cluster.cli_json(&[
            "workflow",
            "artifacts",
            &run.id,
            "--download",
            dl.to_str().unwrap(),
        ]);
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].path, "report/integration.txt");
        let text =
            std::fs::read_to_string(dl.join("test-integration/report/integration.txt")).unwrap();
        assert_eq!(text, "integration tests pass for app:2.0; rm -rf /\n");
        assert_eq!(hex::encode(Sha256::digest(text.as_bytes())), list[0].sha256);
        // Kept in the local directory store under the run.
        let stored = cluster
            .data_dir()
            .join("artifacts/runs")
            .join(&run.id)
            .join("test-integration");
        assert!(stored.exists(), "{}", stored.display());
    }
}

/// Cycles, unknown needs, references to tasks not upstream, unknown
/// actions and fields are refused with file, line and column; nothing is
/// created.
#[tokio::test]
async fn bad_definitions_are_refused_with_their_line() {
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let cases: &[(&str, &[&str])] = &[
        (
            "name: c\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    params: {message: x}\n    needs: [b]\n  - id: b\n    action: echo\n    params: {message: y}\n    needs: [a]\n",
            &["bad.yaml: line 4, column 9", "cycle: a -> b -> a"],
        ),
        (
            "name: r\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: set-output\n    params: {name: x, value: '1'}\n  - id: b\n    action: echo\n    params: {message: '${{ tasks.a.outputs.x }}'}\n",
            &["bad.yaml: line 7, column 9", "tasks.a, which is not upstream of 'b'"],
        ),
        (
            "name: n\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    params: {message: x}\n    needs: [ghost]\n",
            &["bad.yaml: line 7, column 13", "needs 'ghost'"],
        ),
        (
            "name: u\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: launch-missiles\n",
            &["bad.yaml: line 4, column 9", "unknown action 'launch-missiles'"],
        ),
        (
            "name: p\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    params: {mesage: x}\n",
            &["line 4", "has no parameter 'mesage'"],
        ),
        (
            "name: f\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: echo\n    retires: 3\n",
            &["line 6", "retires"],
        ),
        (
            "name: t\ndefaults: {target: '*'}\ntasks:\n  - id: a\n    action: sleep\n    params: {seconds: '1; rm -rf /'}\n",
            &["line 4", "seconds"],
        ),
    ];
    for (yaml, wants) in cases {
        let file = write(&cluster, "bad.yaml", yaml);
        let out = cluster.cli(&["workflow", "submit", "-f", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml} was accepted");
        for want in *wants {
            assert!(stderr.contains(want), "{stderr:?} should contain {want:?}");
        }
    }
    let runs: Vec<Run> = cluster.cli_json(&["workflow", "list"]);
    assert!(runs.is_empty(), "{runs:?}");
}

/// A failed optional task does not fail the run and its dependants run; a
/// failed required task skips its dependants and fails the run.
#[tokio::test]
async fn optional_and_required_failures() {
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let yaml = "name: opt\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: lint, action: fail, optional: true}\n  - {id: build, action: echo, needs: [lint], params: {message: built}}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    let run = wait_run(&cluster, &run.id, Duration::from_secs(20)).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    assert_eq!(task(&run, "lint").state, TaskState::Failed);
    assert!(
        task(&run, "lint")
            .reason
            .as_deref()
            .unwrap()
            .contains("exit code 1"),
        "{run:?}"
    );
    assert_eq!(task(&run, "build").state, TaskState::Succeeded);

    let yaml = "name: req\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: test, action: fail}\n  - {id: deploy, action: echo, needs: [test], params: {message: deployed}}\n  - {id: notify, action: echo, needs: [deploy], params: {message: hi}}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    let run = wait_run(&cluster, &run.id, Duration::from_secs(20)).await;
    assert_eq!(run.state, RunState::Failed);
    assert!(
        run.reason.as_deref().unwrap().contains("test (failed)"),
        "{run:?}"
    );
    assert_eq!(task(&run, "deploy").state, TaskState::Skipped);
    assert_eq!(
        task(&run, "deploy").reason.as_deref(),
        Some("needs test (failed)")
    );
    assert_eq!(task(&run, "notify").state, TaskState::Skipped);
    assert!(task(&run, "deploy").job_id.is_none());
    // `workflow result` exits 4 for a run that did not succeed.
    let out = cluster.cli(&["workflow", "result", &run.id]);
    assert_eq!(out.status.code(), Some(4));
}

/// Cancel mid-run: the running task's process is terminated, waiting tasks
/// are skipped, and the run ends cancelled. A run over its timeout ends
/// timed out the same way.
#[tokio::test]
async fn cancel_and_run_timeout_stop_everything() {
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let yaml = "name: long\nmode: sequential\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: warm, action: echo, params: {message: go}}\n  - {id: soak, action: sleep, params: {seconds: '60'}}\n  - {id: after, action: echo, params: {message: never}}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    wait_for("soak to run", Duration::from_secs(20), || async {
        get_run(&cluster, &run.id)
            .await
            .filter(|r| task(r, "soak").state == TaskState::Running)
    })
    .await;
    // The waiting task says what it waits for.
    let status = cluster.cli_ok(&["workflow", "status", &run.id]);
    assert!(status.contains("waiting for soak"), "{status}");
    let asked = Instant::now();
    cluster.cli_ok(&["workflow", "cancel", &run.id]);
    let done = wait_run(&cluster, &run.id, Duration::from_secs(15)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(done.state, RunState::Cancelled);
    assert_eq!(task(&done, "warm").state, TaskState::Succeeded);
    assert_eq!(task(&done, "soak").state, TaskState::Cancelled);
    assert_eq!(task(&done, "after").state, TaskState::Skipped);
    let job = cluster.job(task(&done, "soak").job_id.as_deref().unwrap());
    assert_eq!(job.attempts[0].signal, Some(15), "{job:?}");
    // Cancelling an ended run is a conflict.
    let out = cluster.cli(&["workflow", "cancel", &run.id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has ended"));

    let yaml = "name: slow\ntimeout: 2s\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: soak, action: sleep, params: {seconds: '60'}}\n  - {id: next, action: echo, needs: [soak], params: {message: never}}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    let done = wait_run(&cluster, &run.id, Duration::from_secs(20)).await;
    assert_eq!(done.state, RunState::TimedOut, "{done:?}");
    assert!(
        done.reason
            .as_deref()
            .unwrap()
            .contains("timed out after 2s"),
        "{done:?}"
    );
    assert_eq!(task(&done, "next").state, TaskState::Skipped);
}

/// `mode: parallel`: every task starts at once, none waiting for another
/// (three 2 s sleeps overlap and the run takes well under their 6 s), a
/// failed task skips nobody (there are no needs) and fails the run once
/// the others have ended; `needs` is refused in that mode.
#[tokio::test]
async fn parallel_mode_starts_every_task_at_once() {
    for backend in BACKENDS {
        let (cluster, _agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        let yaml = "name: fan\nmode: parallel\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: a, action: sleep, params: {seconds: '2'}}\n  - {id: b, action: sleep, params: {seconds: '2'}}\n  - {id: c, action: sleep, params: {seconds: '2'}}\n  - {id: broken, action: fail}\n";
        let run = submit(&cluster, yaml, json!({})).await;
        let done = wait_run(&cluster, &run.id, Duration::from_secs(30)).await;
        assert_eq!(done.state, RunState::Failed, "{backend}: {done:?}");
        assert!(
            done.reason.as_deref().unwrap().contains("broken (failed)"),
            "{backend}: {done:?}"
        );
        for id in ["a", "b", "c"] {
            let t = task(&done, id);
            assert_eq!(t.state, TaskState::Succeeded, "{backend}: {t:?}");
            assert!(t.needs.is_empty(), "{backend}: {t:?}");
        }
        assert_eq!(task(&done, "broken").state, TaskState::Failed);

        // The processes ran at the same time: each sleeper started before
        // any of them ended.
        let attempts: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                let job = cluster.job(task(&done, id).job_id.as_deref().unwrap());
                assert_eq!(job.attempts.len(), 1, "{backend}: {job:?}");
                job.attempts[0].clone()
            })
            .collect();
        let last_start = attempts
            .iter()
            .map(|a| a.started_at.unwrap())
            .max()
            .unwrap();
        let first_end = attempts
            .iter()
            .map(|a| a.finished_at.unwrap())
            .min()
            .unwrap();
        assert!(
            last_start < first_end,
            "{backend}: the sleepers did not overlap: {attempts:#?}"
        );
        // Every task was started in the run's first steps, not one after
        // another.
        let started: Vec<_> = done.tasks.iter().map(|t| t.started_at.unwrap()).collect();
        let spread = *started.iter().max().unwrap() - *started.iter().min().unwrap();
        assert!(
            spread < chrono::Duration::milliseconds(1000),
            "{backend}: tasks started {spread:?} apart"
        );
        let took = done.finished_at.unwrap() - done.created_at;
        assert!(
            took < chrono::Duration::milliseconds(4500),
            "{backend}: three 2 s sleeps in parallel took {took:?}"
        );

        // No `needs` in parallel mode: refused with its line, nothing made.
        let resp = cluster
            .http
            .post(format!("{}/api/v1/workflows/runs", cluster.url))
            .bearer_auth(&cluster.admin_token)
            .json(&json!({
                "definition": "name: p\nmode: parallel\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: a, action: fail}\n  - {id: b, action: fail, needs: [a]}\n",
                "source": "p.yaml",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 422, "{backend}");
        let text = resp.text().await.unwrap();
        for want in ["p.yaml: line 6", "task 'b'", "'needs' is only for mode dag"] {
            assert!(text.contains(want), "{backend}: {want:?} not in {text}");
        }
        let runs: Vec<Run> = cluster.cli_json(&["workflow", "list"]);
        assert_eq!(runs.len(), 1, "{backend}: {runs:?}");
    }
}

/// A task's own `timeout` and `retries` win over its action's, both ways;
/// a task without them takes the action's.
#[tokio::test]
async fn a_task_timeout_and_retries_override_the_action() {
    for backend in BACKENDS {
        let (cluster, _agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        let yaml = "\
name: overrides
defaults: {target: 'role=ci'}
tasks:
  - {id: cut-short, action: sleep, params: {seconds: '30'}, timeout: 1s, optional: true}
  - {id: given-time, action: sleep-briefly, params: {seconds: '2'}, timeout: 10s}
  - {id: no-retry, action: fail-retried, retries: 0, optional: true}
  - {id: retried, action: fail-once, retries: 2, optional: true}
  - {id: action-retries, action: fail-retried, optional: true}
";
        let run = submit(&cluster, yaml, json!({})).await;
        let done = wait_run(&cluster, &run.id, Duration::from_secs(40)).await;
        let job = |id: &str| cluster.job(task(&done, id).job_id.as_deref().unwrap());

        // The action allows 120 s; the task 1 s: the sleep is cut at 1 s
        // and, timeouts not being retried, tried once.
        let j = job("cut-short");
        assert_eq!(
            task(&done, "cut-short").state,
            TaskState::TimedOut,
            "{backend}: {j:?}"
        );
        assert_eq!(j.timeout_secs, 1, "{backend}: {j:?}");
        assert_eq!(j.attempts.len(), 1, "{backend}: {j:?}");
        assert_eq!(j.attempts[0].state, JobState::TimedOut, "{backend}: {j:?}");
        assert!(
            j.attempts[0].duration_ms.unwrap() < 10_000,
            "{backend}: {j:?}"
        );

        // The action allows 1 s; the task 10 s: a 2 s sleep succeeds.
        let j = job("given-time");
        assert_eq!(
            task(&done, "given-time").state,
            TaskState::Succeeded,
            "{backend}: {j:?}"
        );
        assert_eq!(j.timeout_secs, 10, "{backend}: {j:?}");

        // The action retries twice; the task says no retry.
        let j = job("no-retry");
        assert_eq!(
            task(&done, "no-retry").state,
            TaskState::Failed,
            "{backend}: {j:?}"
        );
        assert_eq!(j.max_retries, 0, "{backend}: {j:?}");
        assert_eq!(j.attempts.len(), 1, "{backend}: {j:?}");

        // The action never retries; the task asks for two.
        let j = job("retried");
        assert_eq!(
            task(&done, "retried").state,
            TaskState::Failed,
            "{backend}: {j:?}"
        );
        assert_eq!(j.max_retries, 2, "{backend}: {j:?}");
        let numbers: Vec<u32> = j.attempts.iter().map(|a| a.number).collect();
        assert_eq!(numbers, [1, 2, 3], "{backend}: {j:?}");

        // Without its own, a task takes the action's two retries.
        let j = job("action-retries");
        assert_eq!(j.max_retries, 2, "{backend}: {j:?}");
        assert_eq!(j.attempts.len(), 3, "{backend}: {j:?}");
        assert_eq!(done.state, RunState::Succeeded, "{backend}: {done:?}");
    }
}

/// A task's `description` is in `workflow status` (its first line, in a
/// column shown only when some task has one) and in `-o json` whole.
#[tokio::test]
async fn task_descriptions_show_in_workflow_status() {
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let yaml = "\
name: described
defaults: {target: 'role=ci'}
tasks:
  - id: build
    description: Build the image once
    action: echo
    params: {message: built}
  - id: check
    description: |
      Check the image
      against the staging fleet
    action: echo
    needs: [build]
    params: {message: checked}
  - {id: plain, action: echo, params: {message: plain}}
";
    let file = write(&cluster, "described.yaml", yaml);
    let id = cluster
        .cli_ok(&["workflow", "submit", "-f", &file])
        .trim()
        .to_owned();
    wait_run(&cluster, &id, Duration::from_secs(20)).await;

    let text = cluster.cli_ok(&["workflow", "status", &id]);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with("TASK"))
        .unwrap_or_else(|| panic!("no task table in\n{text}"));
    assert!(header.contains("DESCRIPTION"), "{text}");
    let row = |id: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id} in\n{text}"))
    };
    assert!(row("build").contains("Build the image once"), "{text}");
    assert!(row("check").contains("Check the image"), "{text}");
    assert!(!text.contains("against the staging fleet"), "{text}");

    let run: serde_json::Value = cluster.cli_json(&["workflow", "status", &id]);
    let described: BTreeMap<String, String> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_owned(),
                t["description"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        described,
        BTreeMap::from([
            ("build".to_owned(), "Build the image once".to_owned()),
            (
                "check".to_owned(),
                "Check the image\nagainst the staging fleet\n".to_owned()
            ),
            ("plain".to_owned(), String::new()),
        ])
    );

    // Without any description the table keeps its old columns.
    let yaml = "name: bare\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: only, action: echo, params: {message: x}}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    let text = cluster.cli_ok(&["workflow", "status", &run.id]);
    assert!(
        text.contains("TASK") && !text.contains("DESCRIPTION"),
        "{text}"
    );
}

/// The server is killed (SIGKILL) three times during a 100-task layered
/// DAG. The run completes; every task has one job and one final event.
#[tokio::test]
async fn a_100_task_dag_survives_repeated_server_kills() {
    for backend in BACKENDS {
        let mut cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let mut agents = Vec::new();
        for _ in 0..2 {
            let a = cluster
                .enroll_agent_with(
                    &["--label", "role=ci"],
                    "allow_actions: [\"*\"]\ncapacity: 8\n",
                )
                .await;
            cluster.wait_online(&a.id).await;
            agents.push(a);
        }
        let mut yaml = String::from("name: layers\ndefaults: {target: 'role=ci'}\ntasks:\n");
        for layer in 0..10 {
            for i in 0..10 {
                yaml.push_str(&format!(
                    "  - id: t{layer}-{i}\n    action: sleep\n    params: {{seconds: '0.1'}}\n"
                ));
                if layer > 0 {
                    let needs: Vec<String> =
                        (0..10).map(|j| format!("t{}-{j}", layer - 1)).collect();
                    yaml.push_str(&format!("    needs: [{}]\n", needs.join(", ")));
                }
            }
        }
        let run = submit(&cluster, &yaml, json!({})).await;
        for kill in 0..3 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            cluster.kill_server().await;
            tokio::time::sleep(Duration::from_millis(300 + 200 * kill)).await;
            cluster.start_server().await;
        }
        let done = wait_run(&cluster, &run.id, Duration::from_secs(120)).await;
        assert_eq!(done.state, RunState::Succeeded, "{backend}: {done:?}");
        assert_eq!(done.tasks.len(), 100);
        let jobs: BTreeSet<String> = done
            .tasks
            .iter()
            .map(|t| t.job_id.clone().unwrap())
            .collect();
        assert_eq!(jobs.len(), 100, "{backend}: one job per task");
        // Every task reached its final state exactly once.
        let events = read_events(&cluster, &run.id, 0).await;
        let mut finals: BTreeMap<String, usize> = BTreeMap::new();
        for ev in &events {
            if ev.kind == "task" && ev.state.as_deref() == Some("succeeded") {
                *finals.entry(ev.task.clone().unwrap()).or_default() += 1;
            }
        }
        assert_eq!(finals.len(), 100, "{backend}");
        assert!(finals.values().all(|n| *n == 1), "{backend}: {finals:?}");
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        assert_eq!(
            ids,
            (1..=ids.len() as i64).collect::<Vec<_>>(),
            "{backend}: gapless ids"
        );
        // Each layer started only after the one before ended.
        for layer in 1..10 {
            let first_start = (0..10)
                .map(|i| task(&done, &format!("t{layer}-{i}")).started_at.unwrap())
                .min()
                .unwrap();
            let last_end = (0..10)
                .map(|i| {
                    task(&done, &format!("t{}-{i}", layer - 1))
                        .finished_at
                        .unwrap()
                })
                .max()
                .unwrap();
            assert!(
                first_start >= last_end,
                "{backend}: layer {layer} started early"
            );
        }
        let server_logs: String = (1..=4)
            .map(|n| std::fs::read_to_string(cluster.server_log(n)).unwrap_or_default())
            .collect();
        assert!(!server_logs.contains("panicked"), "{server_logs}");
    }
}

/// Reads a run's whole SSE stream from `after` until the run ends.
async fn read_events(cluster: &Cluster, run: &str, after: i64) -> Vec<RunEvent> {
    let mut resp = cluster
        .http
        .get(format!(
            "{}/api/v1/workflows/runs/{run}/events",
            cluster.url
        ))
        .bearer_auth(&cluster.admin_token)
        .header("last-event-id", after.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut events = Vec::new();
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("stream ended in time")
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    events
}

/// An SSE client that drops its connection and resumes with the last event
/// id it saw gets every event once, in order; the WebSocket gives the same
/// events.
#[tokio::test]
async fn event_streams_resume_from_the_last_event_id() {
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let yaml = "name: ticks\nmode: sequential\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: one, action: tick, params: {tag: one}}\n  - {id: two, action: tick, params: {tag: two}}\n  - {id: three, action: tick, params: {tag: three}}\n";
    let run = submit(&cluster, yaml, json!({})).await;

    // First connection: read a few events, then hang up.
    let mut resp = cluster
        .http
        .get(format!(
            "{}/api/v1/workflows/runs/{}/events",
            cluster.url, run.id
        ))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut first: Vec<RunEvent> = Vec::new();
    let mut buf = String::new();
    while first.len() < 4 {
        let chunk = resp.chunk().await.unwrap().expect("more events");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let ev: RunEvent = serde_json::from_str(data).unwrap();
                assert!(block.contains(&format!("id: {}\n", ev.id)), "{block}");
                first.push(ev);
            }
        }
    }
    drop(resp);
    let last = first.last().unwrap().id;
    // Let events pass while nobody listens.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rest = read_events(&cluster, &run.id, last).await;
    let all: Vec<RunEvent> = first.iter().cloned().chain(rest.iter().cloned()).collect();
    let ids: Vec<i64> = all.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>(), "{all:#?}");
    assert!(all.last().unwrap().ends_run());
    let logs: Vec<String> = all
        .iter()
        .filter(|e| e.kind == "log")
        .map(|e| e.message.clone().unwrap())
        .collect::<Vec<_>>();
    let text = logs.concat();
    for t in ["one", "two", "three"] {
        for i in 1..=3 {
            assert!(text.contains(&format!("{t}-{i}\n")), "{text}");
        }
    }

    // The WebSocket serves the same events.
    let url = format!(
        "ws://127.0.0.1:{}/api/v1/workflows/runs/{}/ws?after=0",
        cluster.port, run.id
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", cluster.admin_token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut over_ws = Vec::new();
    use futures_util::StreamExt;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
    {
        match msg.unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                over_ws.push(serde_json::from_str::<RunEvent>(&t).unwrap())
            }
            tokio_tungstenite::tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(over_ws, all);
}

/// A loopback receiver: answers 500 to the first `fail_first` requests,
/// then 200; records (headers, body) of each.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Request>>>,
}

/// Headers (lower-case names) and body of one request received.
type Request = (BTreeMap<String, String>, String);

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut headers = BTreeMap::new();
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    let (k, v) = l.split_once(':').unwrap();
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
                let len: usize = headers["content-length"].parse().unwrap();
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                record
                    .lock()
                    .unwrap()
                    .push((headers, String::from_utf8(body).unwrap()));
                let status = if n < fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { port, seen }
    }
}

fn hmac_hex(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A definition's webhook and a global one are POSTed when the run ends,
/// signed with HMAC-SHA256; failures are retried with backoff, and every
/// attempt is in the delivery log.
#[tokio::test]
async fn webhooks_are_signed_retried_and_logged() {
    // The receivers listen on loopback, which webhooks may reach only
    // when allowed.
    let options = ServerOptions {
        extra_args: vec![
            "--webhook-backoff".into(),
            "200ms".into(),
            "--webhook-allow".into(),
            "127.0.0.1".into(),
        ],
        ..ServerOptions::default()
    };
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, options).await;
    let flaky = Receiver::start(2);
    let global = Receiver::start(0);
    cluster.cli_ok(&[
        "webhooks",
        "add",
        "--url",
        &format!("http://127.0.0.1:{}/global", global.port),
        "--secret",
        "global-secret-0123456789",
        "--event",
        "failed",
    ]);
    let yaml = format!(
        "name: hooked\ndefaults: {{target: 'role=ci'}}\nwebhooks:\n  - url: http://127.0.0.1:{}/hook\n    secret: definition-secret-42\ntasks:\n  - {{id: a, action: echo, params: {{message: hi}}}}\n",
        flaky.port
    );
    let run = submit(&cluster, &yaml, json!({})).await;
    wait_run(&cluster, &run.id, Duration::from_secs(20)).await;
    let deliveries: Vec<WebhookDelivery> =
        wait_for("delivered", Duration::from_secs(20), || async {
            let d: Vec<WebhookDelivery> =
                cluster.cli_json(&["webhooks", "deliveries", "--run", &run.id]);
            (d.len() == 1 && d[0].state == "delivered").then_some(d)
        })
        .await;
    let d = &deliveries[0];
    assert_eq!(d.attempts, 3, "{d:?}");
    let statuses: Vec<Option<u16>> = d.history.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![Some(500), Some(500), Some(200)]);
    // Backoff: the retries are spread out.
    assert!(
        d.history[2].at - d.history[0].at >= chrono::Duration::milliseconds(300),
        "{d:?}"
    );
    let seen = flaky.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for (headers, body) in &seen {
        assert_eq!(
            headers["x-drover-signature"],
            hmac_hex("definition-secret-42", body)
        );
        assert_eq!(headers["x-drover-event"], "completed");
        assert_eq!(headers["x-drover-delivery"], d.id);
        let payload: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(payload["run_id"], run.id.as_str());
        assert_eq!(payload["state"], "succeeded");
        assert_eq!(payload["tasks"]["a"], "succeeded");
    }
    // The global hook asked only for failures: nothing yet. A failing run
    // reaches it.
    assert!(global.seen.lock().unwrap().is_empty());
    let yaml = "name: broken\ndefaults: {target: 'role=ci'}\ntasks:\n  - {id: a, action: fail}\n";
    let run = submit(&cluster, yaml, json!({})).await;
    wait_run(&cluster, &run.id, Duration::from_secs(20)).await;
    let (headers, body) = wait_for("global hook", Duration::from_secs(20), || async {
        global.seen.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        headers["x-drover-signature"],
        hmac_hex("global-secret-0123456789", &body)
    );
    assert_eq!(headers["x-drover-event"], "failed");
    assert!(body.contains(&run.id));
}

/// A moto S3 server on a free loopback port.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    async fn start() -> Moto {
        let bin = std::env::var("DROVER_TEST_MOTO_SERVER").unwrap_or_else(|_| {
            panic!("DROVER_TEST_MOTO_SERVER is not set: run ./scripts/test, which installs moto[server] from PyPI")
        });
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let http = reqwest::Client::new();
        wait_for("moto to listen", Duration::from_secs(30), || async {
            http.get(format!("http://127.0.0.1:{port}/"))
                .send()
                .await
                .ok()
                .map(drop)
        })
        .await;
        Moto { child, port }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same artifact round trip through an S3-compatible store (moto):
/// a 12 MiB file, uploaded in parts, comes back with the same sha256.
#[tokio::test]
async fn artifacts_round_trip_through_s3() {
    let moto = Moto::start().await;
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let http = reqwest::Client::new();
    let made = http
        .put(format!("{endpoint}/drover-artifacts"))
        .send()
        .await
        .unwrap();
    assert!(
        made.status().is_success(),
        "create bucket: {}",
        made.status()
    );
    let env = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let options = ServerOptions {
        extra_args: vec!["--artifact-store".into(), "s3://drover-artifacts/ci".into()],
        extra_env: vec![
            env("AWS_ENDPOINT", &endpoint),
            env("AWS_ALLOW_HTTP", "true"),
            env("AWS_ACCESS_KEY_ID", "testing"),
            env("AWS_SECRET_ACCESS_KEY", "testing"),
            env("AWS_REGION", "us-east-1"),
        ],
        ..ServerOptions::default()
    };
    let (cluster, _agent) = cluster_with_agent(Backend::Sqlite, options).await;
    let yaml = "name: big\ndefaults: {target: 'role=ci'}\ntasks:\n  - id: make\n    action: random-file\n    params: {bytes: 12582912, path: blob.bin}\n    artifacts: [blob.bin]\n";
    let run = submit(&cluster, yaml, json!({})).await;
    let done = wait_run(&cluster, &run.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    let dl = cluster.dir.path().join("s3-download");
    let list: Vec<Artifact> = cluster.cli_json(&[
        "workflow",
        "artifacts",
        &run.id,
        "--download",
        dl.to_str().unwrap(),
    ]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].size, 12_582_912);
    let bytes = std::fs::read(dl.join("make/blob.bin")).unwrap();
    assert_eq!(bytes.len(), 12_582_912);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), list[0].sha256);
    // It is in the bucket, under the prefix, not in the data dir.
    let listing = http
        .get(format!(
            "{endpoint}/drover-artifacts?list-type=2&prefix=ci/runs/{}",
            run.id
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains("blob.bin"), "{listing}");
    assert!(!cluster.data_dir().join("artifacts/runs").exists());
}
