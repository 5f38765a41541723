//! Issue 13, points 4 and 5, through real processes on both engines: the
//! audit log's hash chain (`drover audit verify` names the row that was
//! edited, deleted or inserted behind the server's back; `drover audit
//! export` gives rows anyone can re-verify; concurrent writers, replicas
//! included, keep one chain) and the per-token and per-user rate limits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CATALOG: &str = r#"
actions:
  - name: echo
    description: Print a message
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
"#;

/// Runs one SQL statement on the cluster's database behind the server's
/// back: the `sqlite3` CLI or `psql`.
fn tamper(cluster: &Cluster, sql: &str) {
    let url = cluster.database_url();
    let out = match cluster.backend {
        Backend::Sqlite => {
            let path = url.strip_prefix("sqlite://").expect("sqlite URL");
            let path = path.split('?').next().unwrap();
            Command::new("sqlite3")
                .args(["-cmd", ".timeout 10000", path, sql])
                .output()
                .expect("run sqlite3 (apt-get install sqlite3)")
        }
        Backend::Postgres => Command::new("psql")
            .args([url, "-v", "ON_ERROR_STOP=1", "-qc", sql])
            .output()
            .expect("run psql"),
    };
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `drover audit verify`: exit status, stdout, stderr.
fn verify(cluster: &Cluster) -> (Option<i32>, String, String) {
    let out = cluster.cli(&["audit", "verify"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn verify_api(cluster: &Cluster) -> Value {
    let resp = cluster
        .http
        .get(format!("{}/api/v1/audit/verify", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .expect("GET /audit/verify");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("verification JSON")
}

fn assert_ok(cluster: &Cluster, rows: u64) {
    let (code, stdout, stderr) = verify(cluster);
    assert_eq!(code, Some(0), "{}: {stdout}{stderr}", cluster.backend);
    assert!(
        stdout.starts_with(&format!("OK: {rows} rows")),
        "{}: {stdout}",
        cluster.backend
    );
}

fn assert_broken(cluster: &Cluster, message: &str) {
    let (code, stdout, stderr) = verify(cluster);
    assert_eq!(code, Some(5), "{}: {stdout}{stderr}", cluster.backend);
    assert!(
        stderr.contains(message),
        "{}: wanted {message:?} in {stderr}",
        cluster.backend
    );
}

/// The documented encoding, written again from docs/SECURITY.md: what an
/// external party would run over an export.
fn recompute(row: &Value) -> String {
    let mut h = Sha256::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => panic!("unexpected field {other}"),
    };
    // Version 2 rows (with a request) hash the request, source and
    // details after the outcome.
    let v2 = row.get("request").is_some_and(|r| !r.is_null());
    let mut keys = vec![
        "id", "at_ms", "actor", "action", "target", "status", "outcome",
    ];
    if v2 {
        keys.extend(["request", "source", "detail"]);
    }
    keys.push("prev_hash");
    let mut fields = vec![if v2 {
        "drover-audit-v2"
    } else {
        "drover-audit-v1"
    }
    .to_owned()];
    for key in keys {
        fields.push(text(row.get(key).unwrap_or(&Value::Null)));
    }
    for f in fields {
        h.update(format!("{}:{f},", f.len()));
    }
    hex::encode(h.finalize())
}

/// The statement that puts an exported row back as it was.
fn insert_row(r: &Value) -> String {
    let s = |k: &str| match r.get(k) {
        Some(Value::String(v)) => format!("'{}'", v.replace('\'', "''")),
        _ => "NULL".to_owned(),
    };
    let n = |k: &str| r[k].as_i64().unwrap();
    format!(
        "INSERT INTO audit (id, at, actor, action, target, status, outcome, request, source, detail, prev_hash, hash) \
         VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {})",
        n("id"),
        n("at_ms"),
        s("actor"),
        s("action"),
        s("target"),
        n("status"),
        s("outcome"),
        s("request"),
        s("source"),
        s("detail"),
        s("prev_hash"),
        s("hash")
    )
}

fn export(cluster: &Cluster, extra: &[&str]) -> Vec<Value> {
    let file = cluster
        .dir
        .path()
        .join(format!("export-{}.jsonl", free_port()));
    let mut args = vec!["audit", "export", "--format", "jsonl", "-o"];
    args.push(file.to_str().unwrap());
    args.extend(extra);
    cluster.cli_ok(&args);
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn start_with_agent(backend: Backend) -> (Cluster, AgentProc) {
    let cluster = Cluster::start(backend).await;
    cluster.apply_actions(CATALOG);
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent)
}

/// Point 4: a fresh server with activity verifies; a row edited with the
/// database's own CLI, a row deleted and a forged row are each named by
/// `drover audit verify` (exit status 5) and by the API; an export
/// re-verifies with nothing but the documented encoding.
#[tokio::test]
async fn verify_names_edited_deleted_and_inserted_rows() {
    for backend in BACKENDS {
        let (cluster, agent) = start_with_agent(backend).await;
        for i in 0..3 {
            // Each job writes its audit entry in its own transaction.
            let id = cluster.submit("echo", &agent.id, &["--param", &format!("message=m{i}")]);
            cluster.wait_job(&id, Duration::from_secs(20)).await;
            cluster.bootstrap_token(&[]);
        }
        let v = verify_api(&cluster).await;
        assert_eq!(v["ok"], true, "{backend}: {v}");
        let rows = v["count"].as_u64().unwrap();
        // Login, catalog, enrollment token and enrollment, 3 jobs, 3 tokens.
        assert!(rows >= 9, "{backend}: {v}");
        assert_eq!(v["head_id"].as_u64(), Some(rows), "{backend}: {v}");
        assert_ok(&cluster, rows);
        // `audit list` still works and shows the jobs.
        let listed: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", "jobs"]);
        assert_eq!(listed.len(), 3, "{backend}: {listed:?}");

        // The export: every row, its hash recomputed from its fields by the
        // documented encoding, each linked to the one before.
        let all = export(&cluster, &[]);
        assert_eq!(all.len() as u64, rows, "{backend}");
        let mut prev = "0".repeat(64);
        for row in &all {
            assert_eq!(
                row["prev_hash"].as_str(),
                Some(prev.as_str()),
                "{backend}: {row}"
            );
            assert_eq!(
                row["hash"].as_str(),
                Some(recompute(row).as_str()),
                "{backend}: {row}"
            );
            prev = row["hash"].as_str().unwrap().to_owned();
        }
        assert_eq!(v["head_hash"].as_str(), Some(prev.as_str()), "{backend}");
        // --since: the rows from then on, linking to the row before.
        let fifth = &all[4];
        let since = fifth["at"].as_str().unwrap();
        let tail = export(&cluster, &["--since", since]);
        assert!(!tail.is_empty() && tail.len() < all.len(), "{backend}");
        assert_eq!(tail.last(), all.last(), "{backend}");
        assert!(
            tail.iter()
                .all(|r| r["at_ms"].as_i64() >= fifth["at_ms"].as_i64()),
            "{backend}"
        );

        // Edited: one field of row 3.
        let row3 = &all[2];
        tamper(&cluster, "UPDATE audit SET actor = 'mallory' WHERE id = 3");
        assert_broken(&cluster, "row 3 was edited");
        let v = verify_api(&cluster).await;
        assert_eq!(v["ok"], false, "{backend}: {v}");
        assert_eq!(v["broken"]["row"], 3, "{backend}: {v}");
        assert_eq!(v["broken"]["kind"], "edited", "{backend}: {v}");
        assert_eq!(v["count"], 2, "{backend}: {v}");
        let metrics = cluster.metrics().await;
        assert!(
            metrics.contains("drover_audit_verify_failures_total 2"),
            "{backend}: {metrics}"
        );
        let actor = row3["actor"].as_str().unwrap();
        tamper(
            &cluster,
            &format!("UPDATE audit SET actor = '{actor}' WHERE id = 3"),
        );
        assert_ok(&cluster, rows);

        // Edited, and its hash recomputed by the documented encoding.
        let mut forged = row3.clone();
        forged["target"] = json!("/api/v1/elsewhere");
        let hash = recompute(&forged);
        tamper(
            &cluster,
            &format!("UPDATE audit SET target = '/api/v1/elsewhere', hash = '{hash}' WHERE id = 3"),
        );
        assert_broken(&cluster, "row 3 was edited (and its hash recomputed)");
        tamper(
            &cluster,
            &format!(
                "UPDATE audit SET target = '{}', hash = '{}' WHERE id = 3",
                row3["target"].as_str().unwrap(),
                row3["hash"].as_str().unwrap()
            ),
        );
        assert_ok(&cluster, rows);

        // Deleted: row 5, then put back as it was.
        tamper(&cluster, "DELETE FROM audit WHERE id = 5");
        assert_broken(&cluster, "a row between 4 and 6 was deleted");
        assert_eq!(verify_api(&cluster).await["broken"]["kind"], "deleted");
        tamper(&cluster, &insert_row(&all[4]));
        assert_ok(&cluster, rows);

        // The first row deleted.
        let first = &all[0];
        tamper(&cluster, "DELETE FROM audit WHERE id = 1");
        assert_broken(&cluster, "a row before 2 was deleted");
        tamper(&cluster, &insert_row(first));
        assert_ok(&cluster, rows);

        // Inserted: a forged row after the last one, linked and hashed
        // correctly, but the head was not moved.
        let forged_id = rows + 1;
        let mut forged = all.last().unwrap().clone();
        forged["id"] = json!(forged_id);
        forged["actor"] = json!("mallory");
        forged["prev_hash"] = json!(prev);
        let hash = recompute(&forged);
        forged["hash"] = json!(hash);
        tamper(&cluster, &insert_row(&forged));
        assert_broken(&cluster, &format!("row {forged_id} was inserted"));
        assert_eq!(verify_api(&cluster).await["broken"]["kind"], "inserted");
        // The head moved as well: the row is now the chain's last, and the
        // head's hash is still the old one's.
        tamper(
            &cluster,
            &format!("UPDATE audit_head SET seq = {forged_id} WHERE id = 1"),
        );
        assert_broken(&cluster, &format!("row {forged_id} was inserted or edited"));
    }
}

/// Point 4: many state-changing calls at once (jobs written in their own
/// transaction, tokens through the middleware; on PostgreSQL through two
/// replicas) still form one chain with no gap.
#[tokio::test]
async fn concurrent_writers_keep_one_chain() {
    for backend in BACKENDS {
        let (cluster, agent) = start_with_agent(backend).await;
        let replica = match backend {
            Backend::Postgres => Some(cluster.start_replica().await),
            Backend::Sqlite => None,
        };
        let urls: Vec<String> = std::iter::once(cluster.url.clone())
            .chain(replica.as_ref().map(|r| r.url.clone()))
            .collect();
        let before = verify_api(&cluster).await["count"].as_u64().unwrap();
        let mut calls = tokio::task::JoinSet::new();
        let n = 120;
        for i in 0..n {
            let http = cluster.http.clone();
            let url = urls[i % urls.len()].clone();
            let token = cluster.admin_token.clone();
            let agent = agent.id.clone();
            calls.spawn(async move {
                let (path, body) = if i % 2 == 0 {
                    (
                        "jobs",
                        json!({"action": "echo", "target": agent, "params": {"message": format!("c{i}")}}),
                    )
                } else {
                    ("tokens", json!({"kind": "bootstrap"}))
                };
                post_json(&http, format!("{url}/api/v1/{path}"), Some(&token), body).await
            });
        }
        while let Some(r) = calls.join_next().await {
            let (status, body) = r.unwrap();
            assert!(status == 201 || status == 200, "{backend}: {status} {body}");
        }
        let v = verify_api(&cluster).await;
        assert_eq!(v["ok"], true, "{backend}: {v}");
        assert_eq!(
            v["count"].as_u64().unwrap(),
            before + n as u64,
            "{backend}: {v}"
        );
        assert_eq!(v["head_id"], v["count"], "{backend}: {v}");
        assert_ok(&cluster, before + n as u64);

        // Fleet stops and agent revocations are in the chain with their
        // actor.
        cluster.cli_ok(&["fleet", "stop", "--reason", "drill"]);
        cluster.cli_ok(&["fleet", "resume"]);
        cluster.cli_ok(&["agents", "revoke", &agent.id, "--reason", "lost laptop"]);
        for (action, target, request, reason) in [
            (
                "fleet.stop",
                "fleet".to_owned(),
                "POST /api/v1/fleet/stop",
                Some("drill"),
            ),
            (
                "fleet.resume",
                "fleet".to_owned(),
                "POST /api/v1/fleet/resume",
                None,
            ),
            (
                "agent.revoke",
                format!("agent:{}", agent.id),
                "POST /api/v1/agents/{id}/revoke",
                Some("lost laptop"),
            ),
        ] {
            let found: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", action]);
            assert_eq!(found.len(), 1, "{backend} {action}: {found:?}");
            assert_eq!(found[0]["actor"], "admin", "{backend}: {found:?}");
            assert_eq!(found[0]["target"], target.as_str(), "{backend}: {found:?}");
            assert_eq!(found[0]["request"], request, "{backend}: {found:?}");
            assert_eq!(found[0]["source"], "127.0.0.1", "{backend}: {found:?}");
            assert_eq!(found[0]["outcome"], "ok", "{backend}: {found:?}");
            assert_eq!(
                found[0]["detail"]["reason"].as_str(),
                reason,
                "{backend}: {found:?}"
            );
            // The request's words still find it.
            let by_request: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", request]);
            assert_eq!(by_request.len(), 1, "{backend} {request}: {by_request:?}");
        }
        assert_ok(&cluster, before + n as u64 + 3);
    }
}

/// Adds a user with one API token straight through the store (no user
/// API exists yet on this branch); returns the token.
async fn second_user(cluster: &Cluster, name: &str) -> String {
    let store = drover_store::Store::open(&drover_store::Options {
        url: cluster.database_url().to_owned(),
        max_connections: 2,
    })
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let user = store
        .create_user(
            name,
            "not-a-password-hash",
            drover_proto::api::Role::Operator,
            &Default::default(),
            now,
        )
        .await
        .unwrap();
    let token = format!("drv_u_{name}-test-token-{}", free_port());
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    store
        .insert_user_token(
            drover_store::NewUserToken {
                user_id: &user.id,
                kind: "api",
                token_hash: &hash,
                name: Some("test"),
                role: None,
                scope: &Default::default(),
                expires_at: None,
            },
            now,
        )
        .await
        .unwrap();
    token
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("GET")
}

/// Point 5: a storm of requests with one token gets 429s with Retry-After
/// and the JSON error body, while another user's calls and /healthz stay
/// prompt; the limits come from drover.toml (token) and a flag (user).
#[tokio::test]
async fn a_token_storm_is_limited_and_others_are_served() {
    for backend in BACKENDS {
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("drover.toml");
        std::fs::write(&config, "token_rate_limit = 5\ntoken_rate_burst = 10\n").unwrap();
        let cluster = Cluster::start_with(
            backend,
            ServerOptions {
                extra_args: vec![
                    "--config".into(),
                    config.to_str().unwrap().into(),
                    "--user-rate-limit".into(),
                    "6".into(),
                    "--user-rate-burst".into(),
                    "15".into(),
                ],
                ..ServerOptions::default()
            },
        )
        .await;
        let other = second_user(&cluster, "bob").await;
        let http = reqwest::Client::new();
        let jobs = format!("{}/api/v1/jobs", cluster.url);

        // The configured burst, then 429 (the login above used no token).
        let mut accepted = 0;
        let refused = loop {
            let resp = get(&http, &jobs, Some(&cluster.admin_token)).await;
            if resp.status() == 429 {
                break resp;
            }
            assert_eq!(resp.status(), 200, "{backend}");
            accepted += 1;
            assert!(accepted <= 12, "{backend}: no 429 after {accepted} calls");
        };
        assert!((10..=12).contains(&accepted), "{backend}: {accepted}");
        let retry: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry), "{backend}: Retry-After {retry}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{backend}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("token"),
            "{backend}: {body}"
        );

        // A refused change is not audited one by one (the metric counts it).
        let (status, _) = post_json(
            &http,
            format!("{}/api/v1/tokens", cluster.url),
            Some(&cluster.admin_token),
            json!({"kind": "bootstrap"}),
        )
        .await;
        assert_eq!(status, 429, "{backend}");

        // A storm with the same token from 8 tasks, while another user and
        // /healthz are served promptly.
        let storm_until = Instant::now() + Duration::from_secs(3);
        let mut storm = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (http, jobs, token) = (http.clone(), jobs.clone(), cluster.admin_token.clone());
            storm.spawn(async move {
                let (mut ok, mut limited) = (0u32, 0u32);
                while Instant::now() < storm_until {
                    let resp = get(&http, &jobs, Some(&token)).await;
                    match resp.status().as_u16() {
                        200 => ok += 1,
                        429 => {
                            assert!(resp.headers().contains_key("retry-after"));
                            limited += 1;
                        }
                        s => panic!("storm got {s}"),
                    }
                }
                (ok, limited)
            });
        }
        let mut slowest = Duration::ZERO;
        while Instant::now() + Duration::from_millis(300) < storm_until {
            for url in [&jobs, &format!("{}/healthz", cluster.url)] {
                let started = Instant::now();
                let resp = get(&http, url, Some(&other)).await;
                assert_eq!(resp.status(), 200, "{backend}: {url}");
                slowest = slowest.max(started.elapsed());
            }
            // Bob stays under his token's 5 a second.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (mut ok, mut limited) = (0, 0);
        while let Some(r) = storm.join_next().await {
            let (o, l) = r.unwrap();
            ok += o;
            limited += l;
        }
        assert!(slowest < Duration::from_secs(1), "{backend}: {slowest:?}");
        // 5 a second for 3 s (plus the refill of the pause above).
        assert!(ok <= 30, "{backend}: {ok} accepted in the storm");
        assert!(limited > 50, "{backend}: only {limited} refused");
        let metrics = cluster.metrics().await;
        let refused_total: u64 = metrics
            .lines()
            .find(|l| l.starts_with("drover_rate_limited_total{limit=\"token\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{backend}: no rate_limited metric in {metrics}"));
        assert_eq!(refused_total, u64::from(limited) + 2, "{backend}");

        // The per-user limit (flag): bob's burst of 15 over two tokens
        // (each of which would take 10).
        let bob2 = second_user_token(&cluster, "bob").await;
        let mut bob_ok = 0;
        for i in 0..40 {
            let token = if i % 2 == 0 { &other } else { &bob2 };
            let resp = get(&http, &jobs, Some(token)).await;
            if resp.status() == 429 {
                let body: Value = resp.json().await.unwrap();
                assert!(
                    body["error"]["message"].as_str().unwrap().contains("user"),
                    "{backend}: {body}"
                );
                break;
            }
            bob_ok += 1;
            assert!(bob_ok < 40, "{backend}: bob was never limited");
        }
        assert!(
            (10..=17).contains(&bob_ok),
            "{backend}: bob made {bob_ok} calls before the user limit"
        );

        // Once the wait is over, the admin's token is served again.
        tokio::time::sleep(Duration::from_secs(retry)).await;
        let resp = get(&http, &jobs, Some(&cluster.admin_token)).await;
        assert_eq!(resp.status(), 200, "{backend}");
        let entries: Vec<Value> = get(
            &http,
            &format!("{}/api/v1/audit?limit=1000", cluster.url),
            Some(&cluster.admin_token),
        )
        .await
        .json()
        .await
        .unwrap();
        assert!(!entries.is_empty(), "{backend}");
        assert!(
            entries.iter().all(|e| e["status"] != 429),
            "{backend}: {entries:?}"
        );
    }
}

/// Another API token of an existing user, through the store.
async fn second_user_token(cluster: &Cluster, name: &str) -> String {
    let store = drover_store::Store::open(&drover_store::Options {
        url: cluster.database_url().to_owned(),
        max_connections: 2,
    })
    .await
    .unwrap();
    let user = store.user_by_username(name).await.unwrap().unwrap();
    let token = format!("drv_u_{name}-second-token-{}", free_port());
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    store
        .insert_user_token(
            drover_store::NewUserToken {
                user_id: &user.id,
                kind: "api",
                token_hash: &hash,
                name: Some("test-2"),
                role: None,
                scope: &Default::default(),
                expires_at: None,
            },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    token
}
