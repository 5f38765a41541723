//! Governance, issue 13 point 2: protected work waits for approval, bound
//! to the hash of exactly what will run. Real server and agent on both
//! engines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_tests::*;
use serde_json::{json, Value};

const CATALOG: &str = r#"
actions:
  - name: deploy
    argv: ["/bin/echo", "deploying"]
  - name: hello
    argv: ["/bin/echo", "hello"]
"#;

async fn api(
    cluster: &Cluster,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = cluster
        .http
        .request(method, format!("{}/api/v1{path}", cluster.url))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// An operator, logged in.
async fn operator(cluster: &Cluster, name: &str) -> String {
    let password = format!("{name}-password-long");
    let (status, body) = api(
        cluster,
        "POST",
        "/users",
        &cluster.admin_token,
        Some(json!({"username": name, "role": "operator", "password": password})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_json(
        &cluster.http,
        format!("{}/api/v1/auth/login", cluster.url),
        None,
        json!({"username": name, "password": password}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// The pending request of a job or run.
async fn pending_for(cluster: &Cluster, id: &str) -> Value {
    wait_for(
        "a pending approval request",
        Duration::from_secs(20),
        || async {
            let (_, list) = api(
                cluster,
                "GET",
                "/approvals?state=pending",
                &cluster.admin_token,
                None,
            )
            .await;
            list.as_array()
                .unwrap()
                .iter()
                .find(|a| a["job_id"] == id || a["run_id"] == id)
                .cloned()
        },
    )
    .await
}

async fn job_state(cluster: &Cluster, id: &str) -> Value {
    api(
        cluster,
        "GET",
        &format!("/jobs/{id}"),
        &cluster.admin_token,
        None,
    )
    .await
    .1
}

#[tokio::test]
async fn protected_work_runs_only_after_approval_of_exactly_what_runs() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&["--label", "env=prod"]).await;
        cluster.wait_online(&agent.id).await;
        let alice = operator(&cluster, "alice").await;
        let bob = operator(&cluster, "bob").await;
        let carol = operator(&cluster, "carol").await;
        cluster.cli_ok(&["approvals", "protect", "action", "deploy"]);
        let submit = |action: &str| json!({"action": action, "target": agent.id});

        // Unprotected work runs at once.
        let (_, hello) = api(&cluster, "POST", "/jobs", &alice, Some(submit("hello"))).await;
        let done = cluster
            .wait_job(hello["id"].as_str().unwrap(), Duration::from_secs(20))
            .await;
        assert_eq!(done.state, JobState::Succeeded);

        // A protected job waits, saying why, and nothing runs.
        let (status, job) = api(&cluster, "POST", "/jobs", &alice, Some(submit("deploy"))).await;
        assert_eq!(status, 201, "{job}");
        assert_eq!(job["state"], "awaiting_approval", "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let request = pending_for(&cluster, &id).await;
        let approval = request["id"].as_str().unwrap().to_owned();
        assert_eq!(request["requested_by"], "alice");
        assert!(request["reasons"][0]
            .as_str()
            .unwrap()
            .contains("action 'deploy' is protected"));
        assert_eq!(request["spec"]["argv"], json!(["/bin/echo", "deploying"]));
        assert_eq!(request["spec"]["agents"], json!([agent.id]));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = job_state(&cluster, &id).await;
        assert_eq!(now["state"], "awaiting_approval");
        assert!(
            now["reason"]
                .as_str()
                .unwrap()
                .contains("awaiting approval"),
            "{now}"
        );
        assert_eq!(now["attempts"][0]["state"], "awaiting_approval");

        // Nobody approves their own request; a rejection needs a reason.
        let (status, answer) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &alice,
            None,
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("own request"));
        let (status, _) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/reject"),
            &bob,
            Some(json!({})),
        )
        .await;
        assert_eq!(status, 422);
        // Bob approves: it runs.
        let out = cluster
            .cli_command(&["approvals", "approve", &approval])
            .env("DROVER_TOKEN", &bob)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let done = cluster.wait_job(&id, Duration::from_secs(20)).await;
        assert_eq!(done.state, JobState::Succeeded);
        let shown: Value =
            serde_json::from_str(&cluster.cli_ok(&["approvals", "show", &approval, "-o", "json"]))
                .unwrap();
        assert_eq!(shown["state"], "approved");
        assert_eq!(shown["approved_by"], json!(["bob"]));

        // Two approvers: one is not enough, nor the same one twice.
        cluster.cli_ok(&[
            "approvals",
            "protect",
            "target",
            "env=prod",
            "--approvers",
            "2",
        ]);
        let (_, job) = api(&cluster, "POST", "/jobs", &alice, Some(submit("hello"))).await;
        let id = job["id"].as_str().unwrap().to_owned();
        assert_eq!(
            job["state"], "awaiting_approval",
            "a protected target: {job}"
        );
        let approval = pending_for(&cluster, &id).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, a) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &bob,
            None,
        )
        .await;
        assert_eq!((status, a["state"].as_str()), (200, Some("pending")), "{a}");
        let (status, _) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &bob,
            None,
        )
        .await;
        assert_eq!(status, 409);
        assert_eq!(job_state(&cluster, &id).await["state"], "awaiting_approval");
        let (status, a) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &carol,
            None,
        )
        .await;
        assert_eq!(
            (status, a["state"].as_str()),
            (200, Some("approved")),
            "{a}"
        );
        assert_eq!(
            cluster.wait_job(&id, Duration::from_secs(20)).await.state,
            JobState::Succeeded
        );
        cluster.cli_ok(&[
            "approvals",
            "protect",
            "target",
            "env=prod",
            "--approvers",
            "1",
        ]);

        // Rejected: cancelled with the reason, and it is final.
        let (_, job) = api(&cluster, "POST", "/jobs", &alice, Some(submit("deploy"))).await;
        let id = job["id"].as_str().unwrap().to_owned();
        let approval = pending_for(&cluster, &id).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let out = cluster
            .cli_command(&[
                "approvals",
                "reject",
                &approval,
                "--reason",
                "not during the freeze",
            ])
            .env("DROVER_TOKEN", &bob)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let done = cluster.wait_job(&id, Duration::from_secs(20)).await;
        assert_eq!(done.state, JobState::Cancelled);
        let why = done.attempts[0].reason.clone().unwrap_or_default();
        assert!(
            why.contains("rejected by bob: not during the freeze"),
            "{why}"
        );
        let (status, _) = api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &carol,
            None,
        )
        .await;
        assert_eq!(status, 409, "a decided request stays decided");

        // Approved, then its spec edited in the database before it was
        // handed out: it waits again under a new request, and the edited
        // command never runs.
        cluster.cli_ok(&["agents", "drain", &agent.id]);
        let (_, job) = api(&cluster, "POST", "/jobs", &alice, Some(submit("deploy"))).await;
        let id = job["id"].as_str().unwrap().to_owned();
        let first = pending_for(&cluster, &id).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, _) = api(
            &cluster,
            "POST",
            &format!("/approvals/{first}/approve"),
            &bob,
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(job_state(&cluster, &id).await["state"], "queued");
        let marker = cluster.dir.path().join("tampered");
        let argv = serde_json::to_string(&["/bin/touch", marker.to_str().unwrap()]).unwrap();
        let n = cluster
            .tamper(&format!(
                "UPDATE jobs SET argv = '{argv}' WHERE id = '{id}'"
            ))
            .await;
        assert_eq!(n, 1);
        cluster.cli_ok(&["agents", "resume", &agent.id]);
        let second = wait_for(
            "a new request for the edited spec",
            Duration::from_secs(20),
            || async {
                let (_, list) = api(
                    &cluster,
                    "GET",
                    "/approvals?state=pending",
                    &cluster.admin_token,
                    None,
                )
                .await;
                list.as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["job_id"] == id.as_str() && a["id"] != first.as_str())
                    .cloned()
            },
        )
        .await;
        assert_eq!(second["spec"]["argv"][0], "/bin/touch", "{second}");
        let old: Value = api(&cluster, "GET", &format!("/approvals/{first}"), &bob, None)
            .await
            .1;
        assert_eq!(old["state"], "superseded", "{old}");
        assert_eq!(job_state(&cluster, &id).await["state"], "awaiting_approval");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!marker.exists(), "the edited command ran without approval");
        let second = second["id"].as_str().unwrap();
        api(
            &cluster,
            "POST",
            &format!("/approvals/{second}/reject"),
            &bob,
            Some(json!({"reason": "tampered"})),
        )
        .await;
        assert_eq!(
            cluster.wait_job(&id, Duration::from_secs(20)).await.state,
            JobState::Cancelled
        );
        assert!(!marker.exists());

        // A protected workflow: the run waits, then runs once approved.
        cluster.cli_ok(&["approvals", "unprotect", &{
            let rules: Vec<Value> =
                serde_json::from_str(&cluster.cli_ok(&["approvals", "rules", "-o", "json"]))
                    .unwrap();
            rules.iter().find(|r| r["kind"] == "target").unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }]);
        cluster.cli_ok(&["approvals", "protect", "workflow", "release-*"]);
        let def = format!(
            "name: release-web\ntasks:\n  - id: a\n    action: hello\n    target: \"{}\"\n",
            agent.id
        );
        let (status, run) = api(
            &cluster,
            "POST",
            "/workflows/runs",
            &alice,
            Some(json!({"definition": def})),
        )
        .await;
        assert_eq!(status, 201, "{run}");
        assert_eq!(run["state"], "awaiting_approval", "{run}");
        let run_id = run["id"].as_str().unwrap().to_owned();
        let request = pending_for(&cluster, &run_id).await;
        assert_eq!(request["spec"]["workflow"], "release-web");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (_, now) = api(
            &cluster,
            "GET",
            &format!("/workflows/runs/{run_id}"),
            &bob,
            None,
        )
        .await;
        assert_eq!(now["state"], "awaiting_approval");
        assert!(
            now["tasks"][0]["job_id"].is_null(),
            "no task starts before approval: {now}"
        );
        let approval = request["id"].as_str().unwrap();
        api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &bob,
            None,
        )
        .await;
        let done = wait_for(
            "the approved run to end",
            Duration::from_secs(30),
            || async {
                let (_, r) = api(
                    &cluster,
                    "GET",
                    &format!("/workflows/runs/{run_id}"),
                    &bob,
                    None,
                )
                .await;
                (r["state"] == "succeeded" || r["state"] == "failed").then_some(r)
            },
        )
        .await;
        assert_eq!(done["state"], "succeeded", "{done}");

        // A task of an unprotected workflow that runs a protected action
        // waits for approval itself.
        let def = format!(
            "name: nightly\ntasks:\n  - id: d\n    action: deploy\n    target: \"{}\"\n",
            agent.id
        );
        let (_, run) = api(
            &cluster,
            "POST",
            "/workflows/runs",
            &alice,
            Some(json!({"definition": def})),
        )
        .await;
        assert_eq!(run["state"], "running");
        let run_id = run["id"].as_str().unwrap().to_owned();
        let job_id = wait_for("the task's job", Duration::from_secs(20), || async {
            let (_, r) = api(
                &cluster,
                "GET",
                &format!("/workflows/runs/{run_id}"),
                &bob,
                None,
            )
            .await;
            r["tasks"][0]["job_id"].as_str().map(str::to_owned)
        })
        .await;
        let approval = pending_for(&cluster, &job_id).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        api(
            &cluster,
            "POST",
            &format!("/approvals/{approval}/approve"),
            &carol,
            None,
        )
        .await;
        let done = wait_for("the run to end", Duration::from_secs(30), || async {
            let (_, r) = api(
                &cluster,
                "GET",
                &format!("/workflows/runs/{run_id}"),
                &bob,
                None,
            )
            .await;
            (r["state"] != "running").then_some(r)
        })
        .await;
        assert_eq!(done["state"], "succeeded", "{done}");

        // Decisions are in the audit, with who made them.
        let (_, audit) = api(
            &cluster,
            "GET",
            "/audit?action=approvals&limit=100",
            &cluster.admin_token,
            None,
        )
        .await;
        let actions: Vec<String> = audit
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["actor"].as_str().unwrap(),
                    e["action"].as_str().unwrap(),
                    e["status"]
                )
            })
            .collect();
        assert!(
            actions
                .iter()
                .any(|a| a.starts_with("bob approval.approve 200")),
            "{actions:?}"
        );
        assert!(
            actions
                .iter()
                .any(|a| a.starts_with("bob approval.reject 200")),
            "{actions:?}"
        );
        assert!(
            actions
                .iter()
                .any(|a| a.starts_with("alice approval.approve 403")),
            "{actions:?}"
        );
        drop(agent);
    }
}

/// A request nobody decides expires with its configured lifetime and its
/// job is cancelled, saying so.
#[tokio::test]
async fn unanswered_requests_expire() {
    for backend in BACKENDS {
        let cluster = Cluster::start_with(
            backend,
            ServerOptions {
                extra_args: vec![
                    "--approval-ttl".into(),
                    "1s".into(),
                    "--attempt-lease".into(),
                    "2s".into(),
                ],
                ..ServerOptions::default()
            },
        )
        .await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        cluster.cli_ok(&["approvals", "protect", "action", "deploy"]);
        let id = cluster.submit("deploy", &agent.id, &[]);
        let done = cluster.wait_job(&id, Duration::from_secs(20)).await;
        assert_eq!(done.state, JobState::Cancelled);
        let why = done.attempts[0].reason.clone().unwrap_or_default();
        assert!(why.contains("expired"), "{why}");
        let list: Vec<Value> =
            serde_json::from_str(&cluster.cli_ok(&["approvals", "list", "--all", "-o", "json"]))
                .unwrap();
        assert_eq!(list[0]["state"], "expired");
        drop(agent);
    }
}

/// Reads server-sent `approval` events until one satisfies `want`.
async fn next_event(
    resp: &mut reqwest::Response,
    buf: &mut String,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.trim_start())
                .collect();
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                if want(&v) {
                    return v;
                }
            }
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("an approval event in time")
            .unwrap()
            .expect("the stream stays open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// The live stream shows a new request and each decision as they happen.
#[tokio::test]
async fn approvals_stream_live() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        let bob = operator(&cluster, "bob").await;
        cluster.cli_ok(&[
            "approvals",
            "protect",
            "action",
            "deploy",
            "--approvers",
            "2",
        ]);
        let mut resp = cluster
            .http
            .get(format!("{}/api/v1/approvals/events", cluster.url))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut buf = String::new();
        let job = cluster.submit("deploy", &agent.id, &[]);
        let ev = next_event(&mut resp, &mut buf, |v| v["job_id"] == job.as_str()).await;
        assert_eq!(ev["state"], "pending");
        let id = ev["id"].as_str().unwrap().to_owned();
        api(
            &cluster,
            "POST",
            &format!("/approvals/{id}/approve"),
            &bob,
            None,
        )
        .await;
        let ev = next_event(&mut resp, &mut buf, |v| v["id"] == id.as_str()).await;
        assert_eq!(
            (ev["state"].as_str(), ev["approved_by"].clone()),
            (Some("pending"), json!(["bob"]))
        );
        api(
            &cluster,
            "POST",
            &format!("/approvals/{id}/reject"),
            &bob,
            Some(json!({"reason": "no"})),
        )
        .await;
        let ev = next_event(&mut resp, &mut buf, |v| v["id"] == id.as_str()).await;
        assert_eq!(ev["state"], "rejected");
        drop(agent);
    }
}
