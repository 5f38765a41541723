//! Foundation: enrollment, heartbeats, identity, restarts, bad input.
//! Each test starts real `drover` and `drover-agent` processes on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use drover_tests::*;
use serde_json::{json, Value};

/// Enroll → heartbeat → listed online, with labels and group from the
/// token, inventory, labels editable, and `drover-agent status` offline.
#[tokio::test]
async fn enrolled_agent_heartbeats_and_is_listed_online() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let agent = cluster
            .enroll_agent(&[
                "--label", "role=web", "--label", "env=test", "--group", "edge",
            ])
            .await;
        let listed = cluster.wait_online(&agent.id).await;
        assert_eq!(
            listed.labels.get("role").map(String::as_str),
            Some("web"),
            "{backend}"
        );
        assert_eq!(listed.group.as_deref(), Some("edge"));
        let inv = listed.inventory.expect("inventory");
        assert!(inv.cpu_count >= 1 && inv.memory_total_bytes > 0 && inv.disk_total_bytes > 0);
        assert!(!inv.kernel.is_empty() && !inv.os.is_empty() && !inv.arch.is_empty());
        assert_eq!(inv.agent_version, env!("CARGO_PKG_VERSION"));

        let all = cluster.agents();
        assert_eq!(all.len(), 1);
        let table = cluster.cli_ok(&["agents", "list"]);
        assert!(table.starts_with("ID"), "{table}");
        assert!(
            table.contains(&agent.id) && table.contains("online"),
            "{table}"
        );

        // A unique prefix is enough to name an agent.
        let short = &agent.id[..13];
        let labelled: Agent =
            cluster.cli_json(&["agents", "label", short, "tier=1", "--remove", "env"]);
        assert_eq!(labelled.labels.len(), 2, "{:?}", labelled.labels);
        assert_eq!(labelled.labels.get("tier").map(String::as_str), Some("1"));
        let shown = cluster.cli_ok(&["agents", "show", short]);
        assert!(
            shown.contains("tier=1") && shown.contains("memory:"),
            "{shown}"
        );

        let status = agent.status();
        assert_eq!(status["agent_id"], json!(agent.id));
        assert_eq!(status["server"], json!(cluster.url));
        assert!(status["last_contact_at"].is_string(), "{status}");
    }
}

/// A used, expired or unknown bootstrap token is refused, saying which.
#[tokio::test]
async fn bootstrap_tokens_are_single_use_and_expire() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let token = cluster.bootstrap_token(&[]);
        let first = AgentProc::new(&cluster.url);
        let out = first
            .command(&["enroll", "--token", &token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let enroll = |token: &str| {
            let agent = AgentProc::new(&cluster.url);
            let out = agent
                .command(&["enroll", "--token", token])
                .output()
                .unwrap();
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let reused = enroll(&token);
        assert!(reused.contains("already used"), "{backend}: {reused}");

        let short_lived = cluster.bootstrap_token(&["--ttl", "1s"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let expired = enroll(&short_lived);
        assert!(expired.contains("expired"), "{expired}");

        let unknown = enroll("drv_b_not-a-real-token");
        assert!(unknown.contains("unknown"), "{unknown}");
        // Only the first enrollment created an agent.
        assert_eq!(cluster.agents().len(), 1);
    }
}

/// Revoking an agent: its next request gets 401, it logs why, stops with
/// exit status 3, remembers it, and is listed as revoked.
#[tokio::test]
async fn revoked_agent_is_refused_and_stops() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let mut agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;

    let out = cluster.cli_ok(&["agents", "revoke", &agent.id, "--reason", "decommissioned"]);
    assert_eq!(out.trim(), agent.id);
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(3), "log:\n{}", agent.log());
    assert!(agent.log().contains("decommissioned"), "{}", agent.log());

    let local = agent.status();
    let rejected = local["credentials_rejected"].as_str().unwrap_or_default();
    assert!(rejected.contains("revoked"), "{local}");
    let listed = cluster.agent(&agent.id);
    assert_eq!(listed.status, AgentStatus::Revoked);
    assert_eq!(listed.revoked_reason.as_deref(), Some("decommissioned"));
    // No new work is accepted for it.
    let out = cluster.cli(&["run", "noop", "--target", &agent.id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is revoked"));

    // It does not try again with the same credentials.
    agent.start();
    let again = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(again.code(), Some(3));
}

fn heartbeat_body() -> Value {
    json!({"inventory": {
        "hostname": "h", "os": "linux", "os_version": "1", "kernel": "6", "arch": "x86_64",
        "cpu_count": 1, "load_avg": [0.0, 0.0, 0.0], "memory_total_bytes": 1, "memory_used_bytes": 1,
        "disk_total_bytes": 1, "disk_available_bytes": 1, "agent_version": "0.1.0",
        "agent_uptime_secs": 1, "system_uptime_secs": 1
    }})
}

/// The refresh token rotates on every use; presenting a rotated one ends
/// the agent's session, after which no credential of it works.
#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_ends_the_session() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let http = &cluster.http;
        let api = |p: &str| format!("{}/api/v1{p}", cluster.url);
        let token = cluster.bootstrap_token(&[]);
        let (code, enrolled) = post_json(
            http,
            api("/agent/enroll"),
            None,
            json!({"token": token, "hostname": "h", "agent_version": "0.1.0"}),
        )
        .await;
        assert_eq!(code, 200, "{enrolled}");
        let r0 = enrolled["credentials"]["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();

        let (code, c1) = post_json(
            http,
            api("/agent/refresh"),
            None,
            json!({"refresh_token": r0}),
        )
        .await;
        assert_eq!(code, 200, "{backend}: {c1}");
        let r1 = c1["refresh_token"].as_str().unwrap().to_owned();
        let a1 = c1["access_token"].as_str().unwrap().to_owned();
        assert_ne!(r0, r1);
        let (code, _) = post_json(http, api("/agent/heartbeat"), Some(&a1), heartbeat_body()).await;
        assert_eq!(code, 200);
        let (code, c2) = post_json(
            http,
            api("/agent/refresh"),
            None,
            json!({"refresh_token": r1}),
        )
        .await;
        assert_eq!(code, 200, "{backend}: {c2}");
        let r2 = c2["refresh_token"].as_str().unwrap().to_owned();

        // r0 was rotated and its successor used: presenting it again is
        // reuse (tests/faults.rs has the grace for a lost answer).
        let (code, reuse) = post_json(
            http,
            api("/agent/refresh"),
            None,
            json!({"refresh_token": r0}),
        )
        .await;
        assert_eq!(
            (code, reuse["error"]["code"].as_str()),
            (401, Some("refresh_token_reused")),
            "{reuse}"
        );
        // The whole session is gone: the current refresh and access tokens too.
        let (code, after) = post_json(
            http,
            api("/agent/refresh"),
            None,
            json!({"refresh_token": r2}),
        )
        .await;
        assert_eq!(
            (code, after["error"]["code"].as_str()),
            (401, Some("session_revoked")),
            "{after}"
        );
        let (code, hb) =
            post_json(http, api("/agent/heartbeat"), Some(&a1), heartbeat_body()).await;
        assert_eq!(
            (code, hb["error"]["code"].as_str()),
            (401, Some("session_revoked")),
            "{hb}"
        );

        let (code, unknown) = post_json(
            http,
            api("/agent/refresh"),
            None,
            json!({"refresh_token": "drv_r_x"}),
        )
        .await;
        assert_eq!(
            (code, unknown["error"]["code"].as_str()),
            (401, Some("refresh_token_unknown"))
        );
        let (code, _) = post_json(
            http,
            api("/agent/heartbeat"),
            Some("not-a-jwt"),
            heartbeat_body(),
        )
        .await;
        assert_eq!(code, 401);
        let (code, _) = post_json(http, api("/agent/heartbeat"), None, heartbeat_body()).await;
        assert_eq!(code, 401);
    }
}

/// A real agent whose access token lives 2 s keeps heartbeating by rotating
/// its refresh token, across restarts of itself.
#[tokio::test]
async fn agent_refreshes_short_lived_credentials() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            agent_access_ttl: Some("2s"),
            ..ServerOptions::default()
        },
    )
    .await;
    let mut agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mark = Utc::now();
    cluster.wait_seen_after(&agent.id, mark).await;
    agent.stop().await;
    agent.start();
    let mark = Utc::now();
    cluster.wait_seen_after(&agent.id, mark).await;
    assert_eq!(agent.status()["last_error"], Value::Null, "{}", agent.log());
}

/// A server restart keeps every agent, and agents keep working with the
/// identity they had (on SQLite and on PostgreSQL).
#[tokio::test]
async fn server_restart_keeps_agents() {
    for backend in BACKENDS {
        let mut cluster = Cluster::start(backend).await;
        let a = cluster.enroll_agent(&["--label", "role=db"]).await;
        let b = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&a.id).await;
        cluster.wait_online(&b.id).await;

        let status = cluster.stop_server().await;
        assert!(status.success(), "clean stop: {status}");
        let log = std::fs::read_to_string(cluster.server_log(1)).unwrap();
        assert!(log.contains("server stopped"), "{log}");
        cluster.start_server().await;
        cluster.admin_token = cluster.login(ADMIN_PASSWORD).await.unwrap();

        let agents = cluster.agents();
        assert_eq!(agents.len(), 2, "{backend}");
        let mark = Utc::now();
        let again = cluster.wait_seen_after(&a.id, mark).await;
        assert_eq!(again.labels.get("role").map(String::as_str), Some("db"));
        cluster.wait_seen_after(&b.id, mark).await;
    }
}

/// The server is killed and stays down for 30 s: the agent backs off, keeps
/// its state, records the error, and reconnects by itself.
#[tokio::test]
async fn agent_rides_out_a_server_outage() {
    let mut cluster = Cluster::start(Backend::Sqlite).await;
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;

    cluster.kill_server().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let local = agent.status();
    assert!(
        local["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot reach"),
        "{local}"
    );
    cluster.start_server().await;
    let mark = Utc::now();
    let seen = cluster.wait_seen_after(&agent.id, mark).await;
    assert_eq!(seen.status, AgentStatus::Online);
    let log = agent.log();
    assert!(
        log.contains("heartbeat failed") && log.contains("reconnected"),
        "{log}"
    );
    // While the server was away the agent backed off instead of spinning:
    // with a 2 s cap, 30 s allow at most ~30 attempts.
    let failures = log.matches("heartbeat failed").count();
    assert!((5..=40).contains(&failures), "{failures} failed attempts");
}

/// Malformed configuration files fail at start with a message naming the
/// file, the line and the field.
#[tokio::test]
async fn malformed_config_files_name_the_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("drover.toml");
    std::fs::write(
        &toml,
        "listen = \"127.0.0.1:1\"\nheartbeat_intervall = \"5s\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("drover"))
        .args(["server", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("drover.toml: line 2") && err.contains("heartbeat_intervall"),
        "{err}"
    );

    std::fs::write(&toml, "max_body_bytes = \"lots\"\n").unwrap();
    let out = std::process::Command::new(bin("drover"))
        .args(["server", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1") && err.contains("max_body_bytes"),
        "{err}"
    );

    let yaml = dir.path().join("agent.yaml");
    std::fs::write(&yaml, "server: http://127.0.0.1:1\n\npol_interval: 5s\n").unwrap();
    let out = std::process::Command::new(bin("drover-agent"))
        .arg("--config")
        .arg(&yaml)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.yaml") && err.contains("pol_interval") && err.contains('3'),
        "{err}"
    );

    std::fs::write(&yaml, "max_backoff: [1, 2]\n").unwrap();
    let out = std::process::Command::new(bin("drover-agent"))
        .arg("--config")
        .arg(&yaml)
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("agent.yaml"), "{err}");
}

/// Bodies above the limit get 413 with a JSON error; malformed JSON and
/// unknown fields get a message naming what is wrong; nothing is created.
#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--max-body-bytes".into(), "4096".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let url = format!("{}/api/v1/agent/enroll", cluster.url);
    let big = json!({"token": "x".repeat(8192), "hostname": "h", "agent_version": "1"});
    let (code, body) = post_json(&cluster.http, url.clone(), None, big).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );

    let (code, body) = post_json(
        &cluster.http,
        url.clone(),
        None,
        json!({"token": "x", "hostname": "h", "agent_version": "1", "admin": true}),
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `admin`"),
        "{body}"
    );

    let resp = cluster
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"token\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    let (code, body) = post_json(
        &cluster.http,
        format!("{}/api/v1/tokens", cluster.url),
        Some(&cluster.admin_token),
        json!({"labels": {"role": "$(rm -rf /)"}}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("role"),
        "{body}"
    );
    assert!(cluster.agents().is_empty());
}

/// `drover login` saves a session in the profile; later commands need no
/// token. A wrong password is refused. Tokens are required everywhere.
#[tokio::test]
async fn login_saves_a_profile_and_tokens_are_required() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let login = |password: &str| {
        let mut child = cluster
            .cli_command(&["login", "--password-stdin"])
            .env_remove("DROVER_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        child.wait_with_output().unwrap()
    };
    let bad = login("wrong");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("wrong username or password"));
    let good = login(ADMIN_PASSWORD);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );

    let out = cluster
        .cli_command(&["agents", "list", "--output", "json"])
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    // An API token made for CI works as DROVER_TOKEN.
    let api_token = cluster.cli_ok(&["token", "create", "--kind", "api", "--name", "ci"]);
    let out = cluster
        .cli_command(&["agents", "list"])
        .env("DROVER_TOKEN", api_token.trim())
        .output()
        .unwrap();
    assert!(out.status.success());

    let resp = cluster
        .http
        .get(format!("{}/api/v1/agents", cluster.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = cluster
        .http
        .get(format!("{}/api/v1/agents", cluster.url))
        .bearer_auth("drv_s_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

/// `/healthz`, `/readyz`, the OpenAPI document, and `/metrics` valid for
/// promtool with HTTP and agent figures.
#[tokio::test]
async fn probes_openapi_and_metrics() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    let get = |p: &str| cluster.http.get(format!("{}{p}", cluster.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    assert_eq!(get("/readyz").await.unwrap().status().as_u16(), 200);

    let doc: Value = get("/api/v1/openapi.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/api/v1/agent/enroll",
        "/api/v1/agents/{id}/revoke",
        "/api/v1/tokens",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    assert!(doc["components"]["schemas"]["Inventory"].is_object());

    let text = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        text.contains("drover_agents{status=\"online\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("drover_http_requests_total{method=\"POST\",route=\"/api/v1/agent/heartbeat\",status=\"200\"}"),
        "{text}"
    );
    promtool_check(&text);

    let open = cluster
        .http
        .get(format!("{}/metrics", cluster.url))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(open.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(open.text().await.unwrap().ends_with("# EOF\n"));
}
