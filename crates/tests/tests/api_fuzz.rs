//! Issue 12, point 14: the OpenAPI document is true. schemathesis generates
//! requests from `/api/v1/openapi.json` (valid and invalid ones) against a
//! real server, with every check enabled: no 5xx, every status, content
//! type, header and body documented and matching its schema, invalid input
//! refused, valid input accepted. Once as the agent (the `agent` tag, with
//! an enrolled agent's token), once as the admin (everything else).
//!
//! schemathesis comes from PyPI into a venv that `scripts/test` keeps;
//! `DROVER_TEST_SCHEMATHESIS` names its executable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};

/// The checks' settings. The API refuses with 422 a request that fits the
/// schema but names something that does not exist or breaks a rule the
/// schema cannot say (an unknown action, a label key's syntax, a TTL range,
/// a workflow definition's content): schema-valid data may get a 422, and
/// that is an answer, not a failure of `positive_data_acceptance`. Every
/// other check keeps its defaults.
const CONFIG: &str = r#"
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"#;

/// Long polls and waits hold a request for as long as it asks (up to 30 s
/// by design); generated values would make the run last minutes. The hook
/// keeps `wait_ms` short, valid values valid and invalid ones as they are.
const HOOKS: &str = r#"
import schemathesis

U64_MAX = 2**64 - 1

def _short(value):
    # Only values the server takes anyway (it holds at most 30 s): one it
    # refuses stays, so an invalid case remains invalid.
    if isinstance(value, int) and not isinstance(value, bool) and 200 < value <= U64_MAX:
        return 200
    if isinstance(value, str) and value.isdigit() and 200 < int(value) <= U64_MAX:
        return "200"
    return value

@schemathesis.hook
def before_call(context, case, kwargs):
    for container in (case.body, case.query):
        if isinstance(container, dict) and "wait_ms" in container:
            container["wait_ms"] = _short(container["wait_ms"])
"#;

fn schemathesis() -> String {
    std::env::var("DROVER_TEST_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "DROVER_TEST_SCHEMATHESIS is not set: it names the schemathesis executable \
             (scripts/test installs it from PyPI into ~/.cache/drover-test/schemathesis-venv)"
        )
    })
}

/// Runs schemathesis against the server's document with `token`, limited
/// by `filters`; panics with its report unless it found nothing.
fn fuzz(exe: &str, dir: &Path, url: &str, token: &str, filters: &[&str]) {
    let started = Instant::now();
    let out = Command::new(exe)
        .arg("--config-file")
        .arg(dir.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{url}/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(filters)
        .args(["--checks", "all"])
        // Bounded and reproducible: few examples per operation, a fixed
        // seed, a time budget for the whole run.
        .args(["--max-examples", "20", "--seed", "20261130"])
        .args(["--max-time", "60", "--request-timeout", "10"])
        .args(["--workers", "2", "--no-color"])
        .args(["--report", "junit", "--report-dir"])
        .arg(dir.join("report"))
        .env("SCHEMATHESIS_HOOKS", "drover_fuzz_hooks")
        .env("PYTHONPATH", dir)
        .current_dir(dir)
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout.lines().rev().take(4).collect::<Vec<_>>();
    eprintln!(
        "schemathesis {filters:?} took {:.0?}: {summary:?}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_in_the_user_and_agent_apis() {
    let exe = schemathesis();
    let cluster = Cluster::start(Backend::Sqlite).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("schemathesis.toml"), CONFIG).expect("config");
    std::fs::write(dir.path().join("drover_fuzz_hooks.py"), HOOKS).expect("hooks");

    // An enrolled agent, for the agent API.
    let token = cluster.bootstrap_token(&[]);
    let enrolled: Value = cluster
        .http
        .post(format!("{}/api/v1/agent/enroll", cluster.url))
        .json(&json!({"token": token, "hostname": "fuzz", "agent_version": "0.1.0"}))
        .send()
        .await
        .expect("enroll")
        .json()
        .await
        .expect("enroll answer");
    let agent_token = enrolled["credentials"]["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access token in {enrolled}"))
        .to_owned();

    let started = Instant::now();
    let url = cluster.url.clone();
    let admin = cluster.admin_token.clone();
    let dir_path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        // The agent API first: the admin run below revokes, drains and
        // stops agents (that agent among them, if a generated id prefix
        // names it), which would turn the agent's calls into 401s.
        fuzz(
            &exe,
            &dir_path,
            &url,
            &agent_token,
            &["--include-tag", "agent"],
        );
        fuzz(
            &exe,
            &dir_path,
            &url,
            &admin,
            &[
                "--exclude-tag",
                "agent",
                // A WebSocket handshake, which schemathesis does not speak
                // (a plain GET is refused with 400 by design); the same
                // events are fuzzed through the SSE stream.
                "--exclude-path",
                "/api/v1/workflows/runs/{id}/ws",
                // Logging out revokes the token presented: the admin's,
                // which every later call needs (governance_roles checks it).
                "--exclude-path",
                "/api/v1/auth/logout",
            ],
        );
    })
    .await
    .expect("schemathesis runs");
    assert!(started.elapsed() < Duration::from_secs(170));

    // The server is still healthy after the runs.
    let health = cluster
        .http
        .get(format!("{}/healthz", cluster.url))
        .send()
        .await
        .expect("healthz");
    assert!(health.status().is_success(), "{}", health.status());
}

/// Sends `body` as raw JSON (so it can repeat a key) and returns the status
/// and the error envelope's message.
async fn post_raw(cluster: &Cluster, path: &str, body: &str) -> (u16, String) {
    let resp = cluster
        .http
        .post(format!("{}{path}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("a JSON error envelope");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    (status, message.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_keys_and_bad_query_strings_are_refused_in_the_envelope() {
    let cluster = Cluster::start(Backend::Sqlite).await;

    // Duplicate keys: serde_json would keep the last one silently.
    let (status, message) = post_raw(
        &cluster,
        "/api/v1/jobs",
        r#"{"action": "noop", "target": "*", "params": {"n": 1, "n": 2}}"#,
    )
    .await;
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("duplicate key 'n'"), "{message}");
    let (status, message) = post_raw(
        &cluster,
        "/api/v1/workflows/runs",
        r#"{"definition": {"name": "w", "tasks": {}}, "inputs": {"i": "a", "i": "b"}}"#,
    )
    .await;
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("duplicate key 'i'"), "{message}");
    let (status, message) = post_raw(
        &cluster,
        "/api/v1/workflows/runs",
        r#"{"definition": {"name": "w", "name": "v", "tasks": {}}}"#,
    )
    .await;
    assert_eq!(status, 422, "{message}");
    assert!(message.contains("duplicate key 'name'"), "{message}");

    // A query string the route cannot read: 400 in the JSON envelope,
    // naming the parameter, not axum's plain text.
    for path in [
        "/api/v1/jobs?limit=abc",
        "/api/v1/workflows/runs?state=bogus",
    ] {
        let resp = cluster
            .http
            .get(format!("{}{path}", cluster.url))
            .bearer_auth(&cluster.admin_token)
            .send()
            .await
            .expect("get");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("a JSON error envelope");
        assert!(status == 400 || status == 422, "{path}: {status} {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}: {body}");
    }
    let resp = cluster
        .http
        .get(format!("{}/api/v1/jobs?limit=abc", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("envelope");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("limit")),
        "{body}"
    );

    // The served document: Action is one closed object carrying the
    // catalog's fields, and every operation documents 500.
    let doc: Value = cluster
        .http
        .get(format!("{}/api/v1/openapi.json", cluster.url))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("document");
    let action = &doc["components"]["schemas"]["Action"];
    assert!(action.get("allOf").is_none(), "{action}");
    assert!(action["properties"]["hash"].is_object(), "{action}");
    assert!(action["properties"]["argv"].is_object(), "{action}");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            assert!(
                op["responses"]["500"].is_object(),
                "{method} {path} does not document 500"
            );
        }
    }
}
