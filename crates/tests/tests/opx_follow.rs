//! Following work from the CLI (issue 14): `--follow -o json` prints one
//! JSON event per line and nothing else; a job on several agents prefixes
//! each line with its agent and ends with a per-agent summary; a failed
//! run says "run"; waiting reasons are said once per cause; `jobs cancel`
//! says what it did and refuses an ended job; Ctrl-C on a follow says the
//! work goes on and how to cancel it (or cancels it). Real processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use drover_tests::*;
use serde_json::Value;

const CATALOG: &str = r#"
actions:
  - name: probe
    description: Prints, then fails (exit 3) on the agent whose working dir holds the marker
    argv: ["/bin/sh", "-c", "echo start; case \"$PWD\" in *\"$1\"*) echo broken >&2; exit 3;; esac; echo fine", "sh", "{{marker}}"]
    params:
      marker: {type: string, max_length: 200}
    timeout: 20s
  - name: ticker
    argv: ["/bin/sh", "-c", "echo tick; sleep 60"]
    timeout: 120s
    kill_grace: 1s
"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every line of stdout parsed as JSON (a line that is not fails the test).
fn ndjson(stdout: &[u8]) -> Vec<Value> {
    let out = text(stdout);
    assert!(!out.trim().is_empty(), "no events");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{out}")))
        .collect()
}

fn events<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|e| e["event"] == kind).collect()
}

/// The name of a test agent's temp dir: the `probe` action fails on the
/// agent whose working dir is under it.
fn marker(agent: &AgentProc) -> String {
    agent
        .state
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// What the CLI calls an agent when all run on one host: its short id.
fn short(agent: &AgentProc) -> &str {
    &agent.id[..13]
}

async fn cluster_with_two_agents(backend: Backend) -> (Cluster, AgentProc, AgentProc) {
    let cluster = Cluster::start(backend).await;
    cluster.apply_actions(CATALOG);
    let good = cluster
        .enroll_agent(&["--label", "role=web", "--group", "local"])
        .await;
    let bad = cluster.enroll_agent(&["--label", "role=web"]).await;
    cluster.wait_online(&good.id).await;
    cluster.wait_online(&bad.id).await;
    (cluster, good, bad)
}

/// `drover run probe --target role=web --follow` on two agents, one of
/// which fails: each line names its agent, a per-agent summary ends it,
/// and the error says which agent failed and how; with `-o json` the same
/// comes as events, and stdout holds nothing else.
#[tokio::test]
async fn fanned_out_follow_names_agents_and_the_failure() {
    for backend in BACKENDS {
        let (cluster, good, bad) = cluster_with_two_agents(backend).await;
        let param = format!("marker={}", marker(&bad));
        let args = [
            "run", "probe", "--target", "role=web", "--param", &param, "--follow",
        ];
        let out = cluster.cli(&args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(4), "{backend}: {stdout}\n{stderr}");
        for want in [
            format!("[{}] start\n", short(&good)),
            format!("[{}] fine\n", short(&good)),
            format!("[{}] start\n", short(&bad)),
        ] {
            assert!(stdout.contains(&want), "{backend}: {want:?} in\n{stdout}");
        }
        assert!(!stdout.contains("broken"), "{stdout}");
        assert!(
            stderr.contains(&format!("[{}] broken\n", short(&bad))),
            "{stderr}"
        );
        // The summary: one row per agent, then the error naming the agent.
        let row = |a: &AgentProc| {
            stderr
                .lines()
                .find(|l| l.starts_with(short(a)) && !l.starts_with('['))
                .unwrap_or_else(|| panic!("no summary row for {} in\n{stderr}", a.id))
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert!(stderr.contains("AGENT"), "{stderr}");
        assert_eq!(row(&good)[2..4], ["succeeded", "0"], "{stderr}");
        assert_eq!(row(&bad)[2..4], ["failed", "3"], "{stderr}");
        let id = cluster.cli_json::<Vec<Job>>(&["jobs", "list"])[0]
            .id
            .clone();
        assert!(
            stderr.contains(&format!(
                "error: job {id} ended failed on 1 of 2 agents: agent {} failed (exit code 3)",
                short(&bad)
            )),
            "{backend}: {stderr}"
        );

        // The same as JSON events, one per line.
        let mut json_args = args.to_vec();
        json_args.extend(["-o", "json"]);
        let out = cluster.cli(&json_args);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
        let all = ndjson(&out.stdout);
        assert_eq!(all[0]["event"], "job", "{all:?}");
        let output = events(&all, "output");
        let line = |agent: &AgentProc, stream: &str, line: &str| {
            output.iter().any(|e| {
                e["agent"] == agent.id.as_str() && e["stream"] == stream && e["line"] == line
            })
        };
        assert!(line(&good, "stdout", "fine"), "{output:?}");
        assert!(line(&bad, "stderr", "broken"), "{output:?}");
        assert!(!line(&bad, "stdout", "fine"), "{output:?}");
        let states = events(&all, "state");
        assert!(
            states
                .iter()
                .any(|e| e["agent"] == bad.id.as_str() && e["state"] == "failed"),
            "{states:?}"
        );
        let end = all.last().unwrap();
        assert_eq!(end["event"], "end", "{all:?}");
        assert_eq!(end["state"], "failed");
        let summary = |a: &AgentProc| {
            end["agents"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["agent"] == a.id.as_str())
                .cloned()
                .unwrap()
        };
        assert_eq!(summary(&good)["state"], "succeeded");
        assert_eq!(summary(&bad)["state"], "failed");
        assert_eq!(summary(&bad)["exit_code"], 3);

        // `jobs logs` names the agents too, and gives events with -o json,
        // following or not.
        let id = cluster.cli_json::<Vec<Job>>(&["jobs", "list"])[0]
            .id
            .clone();
        let logs = cluster.cli(&["jobs", "logs", &id]);
        assert!(
            text(&logs.stdout).contains(&format!("[{}] fine\n", short(&good))),
            "{}",
            text(&logs.stdout)
        );
        assert!(
            text(&logs.stderr).contains(&format!("[{}] broken\n", short(&bad))),
            "{}",
            text(&logs.stderr)
        );
        let logs = ndjson(
            &cluster
                .cli_ok(&["jobs", "logs", &id, "-o", "json"])
                .into_bytes(),
        );
        assert!(logs.iter().all(|e| e["event"] == "output"), "{logs:?}");
        assert_eq!(logs.len(), 4, "{logs:?}");
        let out = cluster.cli(&["jobs", "logs", &id, "--follow", "-o", "json"]);
        let followed = ndjson(&out.stdout);
        assert_eq!(followed.last().unwrap()["event"], "end");
        assert_eq!(events(&followed, "output").len(), 4);
    }
}

/// `drover run ... -o json --follow` on one agent: the job's output is an
/// event like the rest, never a bare line; the text view stays the job's
/// own output.
#[tokio::test]
async fn single_agent_follow_json_is_only_events() {
    let (cluster, good, _bad) = cluster_with_two_agents(Backend::Sqlite).await;
    let out = cluster.cli(&[
        "run",
        "probe",
        "--target",
        &good.id,
        "--param",
        "marker=nowhere",
        "--follow",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = ndjson(&out.stdout);
    let lines: Vec<&Value> = events(&all, "output")
        .into_iter()
        .map(|e| &e["line"])
        .collect();
    assert_eq!(lines, ["start", "fine"], "{all:?}");
    assert!(events(&all, "state")
        .iter()
        .any(|e| e["state"] == "succeeded"));
    assert_eq!(all.last().unwrap()["state"], "succeeded");

    let out = cluster.cli(&[
        "run",
        "probe",
        "--target",
        &good.id,
        "--param",
        "marker=nowhere",
        "--follow",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "start\nfine\n");
}

/// `drover workflow submit -f examples/diamond.yaml -o json --follow`
/// prints events only; a failed run's error says "run" and names the task
/// that failed.
#[tokio::test]
async fn workflow_follow_json_and_failed_run() {
    let (cluster, _good, bad) = cluster_with_two_agents(Backend::Sqlite).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let catalog = root.join("examples/actions.yaml");
    cluster.cli_ok(&["actions", "apply", "-f", catalog.to_str().unwrap()]);
    let diamond = root.join("examples/diamond.yaml");
    let out = cluster.cli(&[
        "workflow",
        "submit",
        "-f",
        diamond.to_str().unwrap(),
        "-o",
        "json",
        "--follow",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = ndjson(&out.stdout);
    assert_eq!(all[0]["event"], "submitted", "{all:?}");
    assert!(
        events(&all, "output")
            .iter()
            .any(|e| e["task"] == "publish" && e["line"] == "published app:1.0.0"),
        "{all:?}"
    );
    assert!(events(&all, "task")
        .iter()
        .any(|e| e["task"] == "build" && e["state"] == "succeeded"));
    let end = all.last().unwrap();
    assert_eq!(
        (&end["event"], &end["state"]),
        (&"end".into(), &"succeeded".into())
    );
    assert_eq!(end["tasks"].as_array().unwrap().len(), 4);

    // A run whose required task fails: the error says run, and which task.
    let yaml = format!(
        "name: breaks\ntasks:\n  - {{id: check, action: probe, target: '{}', params: {{marker: '{}'}}}}\n  - {{id: after, action: probe, needs: [check], target: '{}', params: {{marker: no-such-marker}}}}\n",
        bad.id,
        marker(&bad),
        bad.id
    );
    let file = cluster.dir.path().join("breaks.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = cluster.cli(&[
        "workflow",
        "submit",
        "-f",
        file.to_str().unwrap(),
        "--follow",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let run = cluster.cli_json::<Vec<Value>>(&["workflow", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        stderr.contains(&format!(
            "error: run {run} ended failed: task check failed ("
        )),
        "{stderr}"
    );
    assert!(stderr.contains("exit code 3"), "{stderr}");
    assert!(!stderr.contains("error: job"), "{stderr}");
    let out = cluster.cli(&["workflow", "result", &run]);
    assert!(
        text(&out.stderr).contains(&format!("error: run {run} ended failed")),
        "{}",
        text(&out.stderr)
    );
}

/// During a fleet stop, a job on two agents gives the paused dispatch as
/// its reason once, with the number of agents it holds.
#[tokio::test]
async fn a_fleet_stop_is_one_reason_not_one_per_attempt() {
    for backend in BACKENDS {
        let (cluster, _good, _bad) = cluster_with_two_agents(backend).await;
        cluster.cli_ok(&["fleet", "stop", "--reason", "drill"]);
        let id = cluster.submit("probe", "role=web", &["--param", "marker=no-such-marker"]);
        let job = cluster.job(&id);
        assert_eq!(job.attempts.len(), 2);
        let reason = job.reason.unwrap_or_default();
        assert_eq!(
            reason.matches("dispatch is paused fleet-wide").count(),
            1,
            "{backend}: {reason}"
        );
        assert!(reason.ends_with("(2 agents)"), "{backend}: {reason}");
        let shown = cluster.cli_ok(&["jobs", "show", &id]);
        let waiting = shown
            .lines()
            .find(|l| l.starts_with("waiting:"))
            .unwrap_or_else(|| panic!("{shown}"));
        assert_eq!(waiting.matches("drill").count(), 1, "{waiting}");
        cluster.cli_ok(&["fleet", "resume"]);
        let job = cluster.wait_job(&id, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
}

/// Starts `drover ARGS` with stdout piped and waits until a stdout line
/// contains `want` (the follow is then under way).
fn start_following(cluster: &Cluster, args: &[&str], want: &str) -> Child {
    let mut child = cluster
        .cli_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = want.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(&wanted) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{args:?} never printed {want:?}"));
    child
}

/// SIGINT, as Ctrl-C sends it; returns the exit code and stderr.
async fn interrupt(mut child: Child) -> (Option<i32>, String) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = wait_exit(&mut child, Duration::from_secs(15)).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

/// Ctrl-C on `drover run --follow` leaves the job running and says how to
/// cancel it (exit 130); `--cancel-on-interrupt` cancels it. `jobs cancel`
/// says "cancel requested", waits with `--wait`, and refuses an ended job
/// (the API answers 409). Ctrl-C on `workflow submit --follow` says the
/// run goes on.
#[tokio::test]
async fn interrupts_and_cancels_say_what_happens() {
    let (cluster, good, _bad) = cluster_with_two_agents(Backend::Sqlite).await;
    let follow = ["run", "ticker", "--target", &good.id, "--follow"];
    let child = start_following(&cluster, &follow, "tick");
    let (code, stderr) = interrupt(child).await;
    let id = cluster.cli_json::<Vec<Job>>(&["jobs", "list"])[0]
        .id
        .clone();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "job {id} goes on without you; cancel it with: drover jobs cancel {id}"
        )),
        "{stderr}"
    );
    assert_eq!(cluster.job(&id).state, JobState::Running);

    // Cancel it and wait: the final state.
    let out = cluster.cli_ok(&["jobs", "cancel", &id, "--wait"]);
    assert_eq!(out, format!("job {id} cancelled\n"));
    // An ended job: an error naming its state; the API says 409.
    let out = cluster.cli(&["jobs", "cancel", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!(
            "job {id} already ended cancelled; nothing to cancel"
        )),
        "{}",
        text(&out.stderr)
    );
    let resp = cluster
        .http
        .post(format!("{}/api/v1/jobs/{id}/cancel", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict", "{body}");

    // Without --wait: "cancel requested".
    let other = cluster.submit("ticker", &good.id, &[]);
    cluster.wait_running(&other).await;
    let out = cluster.cli_ok(&["jobs", "cancel", &other]);
    assert_eq!(out, format!("cancel requested for job {other}\n"));

    // --cancel-on-interrupt: Ctrl-C cancels the job.
    let mut args = follow.to_vec();
    args.extend(["--cancel-on-interrupt", "-o", "json"]);
    let child = start_following(&cluster, &args, "\"line\":\"tick\"");
    let (code, stderr) = interrupt(child).await;
    let id = cluster.cli_json::<Vec<Job>>(&["jobs", "list"])[0]
        .id
        .clone();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("cancel requested for job {id}")),
        "{stderr}"
    );
    let job = cluster.wait_job(&id, Duration::from_secs(15)).await;
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");

    // A workflow run followed and interrupted goes on.
    let file = cluster.dir.path().join("tick.yaml");
    std::fs::write(
        &file,
        format!(
            "name: tick\ntasks:\n  - {{id: t, action: ticker, target: '{}'}}\n",
            good.id
        ),
    )
    .unwrap();
    let child = start_following(
        &cluster,
        &[
            "workflow",
            "submit",
            "-f",
            file.to_str().unwrap(),
            "--follow",
        ],
        "[t] tick",
    );
    let (code, stderr) = interrupt(child).await;
    let run = cluster.cli_json::<Vec<Value>>(&["workflow", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "run {run} goes on without you; cancel it with: drover workflow cancel {run}"
        )),
        "{stderr}"
    );
    let out = cluster.cli_ok(&["workflow", "cancel", &run, "--wait"]);
    assert_eq!(out, format!("run {run} cancelled\n"));
}
