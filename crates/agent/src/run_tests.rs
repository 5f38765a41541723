//! The whole agent (`run`) against a fake in-process server: drains the
//! outbox at start, runs allowed work, rejects the rest, obeys cancels
//! and forced stops, reports its inventory,
//! and stops cleanly; and the shared session's refresh rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use drover_proto::jobs::{Assignment, AttemptResult, Outcome};
use drover_proto::ErrorCode;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};
use crate::outbox::Outbox;
use crate::session::Session;
use crate::state::{StateDir, StoredCredentials};
use crate::AgentConfig;

#[derive(Default)]
struct Fake {
    /// (path without the API prefix, body) of every request.
    calls: Vec<(String, Value)>,
    assignments: VecDeque<Assignment>,
    cancels: Vec<String>,
    /// Of the cancels, those to kill at once.
    kills: Vec<String>,
}

type Shared = Arc<Mutex<Fake>>;

async fn handle(fake: Shared, req: hyper::Request<hyper::body::Incoming>) -> Value {
    let path = req
        .uri()
        .path()
        .trim_start_matches(drover_proto::API_PREFIX)
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    fake.lock()
        .unwrap()
        .calls
        .push((path.clone(), body.clone()));
    match path.as_str() {
        "/agent/refresh" => {
            let n = fake
                .lock()
                .unwrap()
                .calls
                .iter()
                .filter(|(p, _)| p == "/agent/refresh")
                .count();
            json!({
                "access_token": format!("fresh-{n}"),
                "access_expires_at": Utc::now() + chrono::Duration::hours(1),
                "refresh_token": format!("refresh-{n}"),
            })
        }
        "/agent/heartbeat" => json!({"heartbeat_interval_secs": 1, "server_time": Utc::now()}),
        "/agent/poll" => {
            // Hold the poll a little while there is nothing to hand out.
            for _ in 0..15 {
                {
                    let mut f = fake.lock().unwrap();
                    let free = body["free_slots"].as_u64().unwrap_or(0) as usize;
                    if !f.assignments.is_empty() && free > 0 || !f.cancels.is_empty() {
                        let kill = std::mem::take(&mut f.kills);
                        let n = free.min(f.assignments.len());
                        let assignments: Vec<_> = f.assignments.drain(..n).collect();
                        let cancel = std::mem::take(&mut f.cancels);
                        return json!({"assignments": assignments, "cancel": cancel, "kill": kill});
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            json!({"assignments": [], "cancel": []})
        }
        "/agent/leases" => {
            json!({"renewed": body["attempt_ids"], "cancel": [], "lease_ms": 3000})
        }
        p if p.ends_with("/result") => json!({"recorded": true}),
        _ => json!({}),
    }
}

async fn start_fake(fake: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let fake = fake.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fake = fake.clone();
                    async move {
                        let v = handle(fake, req).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(v.to_string()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

fn credentials(url: &str) -> StoredCredentials {
    StoredCredentials {
        server: url.to_owned(),
        agent_id: "agent-1".into(),
        access_token: "access".into(),
        access_expires_at: Utc::now() + chrono::Duration::hours(1),
        refresh_token: "refresh".into(),
        enrolled_at: Utc::now(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn refused(code: ErrorCode) -> ClientError {
    ClientError::Refused {
        status: 401,
        code,
        message: "no".into(),
        retry_after: None,
    }
}

/// Several tasks whose token expired at once: one refresh, every call
/// retried with the fresh token, which is persisted.
#[test]
fn concurrent_expiries_refresh_once() {
    rt().block_on(async {
        let fake: Shared = Arc::default();
        let url = start_fake(fake.clone()).await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let session = Arc::new(Session::new(
            Client::new(&url, None).unwrap(),
            dir.clone(),
            credentials(&url),
        ));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let session = session.clone();
            tasks.push(tokio::spawn(async move {
                session
                    .call(|_, token| async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if token == "access" {
                            Err(refused(ErrorCode::TokenExpired))
                        } else {
                            Ok(token)
                        }
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "fresh-1");
        }
        let refreshes: Vec<Value> = fake
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(p, _)| p == "/agent/refresh")
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(refreshes, vec![json!({"refresh_token": "refresh"})]);
        assert_eq!(
            dir.credentials().unwrap().unwrap().refresh_token,
            "refresh-1"
        );
        assert!(!session.rejected().is_cancelled());

        // A terminal refusal anywhere rejects the session for every task.
        let r: Result<(), _> = session
            .call(|_, _| async { Err(refused(ErrorCode::AgentRevoked)) })
            .await;
        assert!(r.unwrap_err().is_terminal());
        assert!(session.rejected().is_cancelled());
        assert!(session.rejection().unwrap().contains("agent_revoked"));
    });
}

fn assignment(id: &str, action: &str, argv: &[&str]) -> Assignment {
    Assignment {
        attempt_id: id.to_owned(),
        job_id: format!("job-{id}"),
        action: action.to_owned(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        timeout_ms: 20_000,
        kill_grace_ms: 1_000,
        log_cap_bytes: 1 << 20,
        lease_ms: 3_000,
        artifacts: Vec::new(),
        sandbox: None,
        workspace: None,
        mask: Vec::new(),
        seal: None,
    }
}

fn results(fake: &Shared) -> Vec<AttemptResult> {
    fake.lock()
        .unwrap()
        .calls
        .iter()
        .filter(|(p, _)| p.ends_with("/result"))
        .map(|(_, b)| serde_json::from_value(b.clone()).unwrap())
        .collect()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn runs_work_end_to_end() {
    rt().block_on(async {
        let fake: Shared = Arc::default();
        let url = start_fake(fake.clone()).await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        dir.save_credentials(&credentials(&url)).unwrap();
        // A result left by a previous run that was killed.
        let outbox = Outbox::open(&dir).unwrap();
        outbox
            .put(&crate::executor::rejected(
                &assignment("old-1", "x", &[]),
                &crate::executor::Refusal::AtCapacity { capacity: 1 },
            ))
            .unwrap();
        {
            let mut f = fake.lock().unwrap();
            f.assignments
                .push_back(assignment("a-1", "echo", &["/bin/echo", "hello"]));
            f.assignments
                .push_back(assignment("a-2", "reboot", &["/sbin/reboot"]));
            f.assignments
                .push_back(assignment("a-3", "echo-sleep", &["sleep", "100"]));
        }
        let config = AgentConfig {
            server: None,
            state_dir: tmp.path().to_owned(),
            log_format: crate::config::LogFormat::Human,
            log_level: String::new(),
            max_backoff: Duration::from_secs(2),
            allow_actions: vec!["echo*".into()],
            capacity: 2,
            metrics_listen: None,
            docker_host: crate::config::DockerHost::Off,
            allow_sandboxes: vec![
                crate::config::SandboxKind::Process,
                crate::config::SandboxKind::Docker,
            ],
            workspace_local_roots: Vec::new(),
            pin: None,
        };
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { crate::run(&config, shutdown).await }
        });

        let ids = |fake: &Shared| {
            let mut v: Vec<String> = results(fake).into_iter().map(|r| r.attempt_id).collect();
            v.sort();
            v
        };
        wait_until("three results", || ids(&fake).len() >= 3).await;
        assert_eq!(ids(&fake), vec!["a-1", "a-2", "old-1"]);
        // a-3 runs: cancel it through the poll.
        wait_until("a-3 started", || {
            fake.lock()
                .unwrap()
                .calls
                .iter()
                .any(|(p, _)| p == "/agent/attempts/a-3/start")
        })
        .await;
        fake.lock().unwrap().cancels.push("a-3".into());
        wait_until("a-3 result", || ids(&fake).len() >= 4).await;

        let by_id = |id: &str| {
            results(&fake)
                .into_iter()
                .find(|r| r.attempt_id == id)
                .unwrap()
        };
        assert_eq!(by_id("a-1").outcome, Outcome::Succeeded);
        let a2 = by_id("a-2");
        assert_eq!(a2.outcome, Outcome::Rejected);
        assert_eq!(
            a2.error.as_deref(),
            Some("action 'reboot' is not in this agent's allow-list")
        );
        assert_eq!(by_id("a-3").outcome, Outcome::Cancelled);

        // Start, then output, then the result, for a-1.
        let calls: Vec<(String, Value)> = fake.lock().unwrap().calls.clone();
        let pos = |p: &str| calls.iter().position(|(path, _)| path == p).unwrap();
        let logs: Vec<&Value> = calls
            .iter()
            .filter(|(p, _)| p == "/agent/attempts/a-1/logs")
            .map(|(_, b)| b)
            .collect();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0]["data"], "hello\n");
        assert_eq!(logs[0]["seq"], 0);
        assert_eq!(logs[0]["stream"], "stdout");
        assert!(pos("/agent/attempts/a-1/start") < pos("/agent/attempts/a-1/logs"));
        assert!(pos("/agent/attempts/a-1/logs") < pos("/agent/attempts/a-1/result"));
        // Nothing ran for the refused action.
        assert!(!calls.iter().any(|(p, _)| p == "/agent/attempts/a-2/start"));
        // Polls announce the capacity.
        assert!(calls
            .iter()
            .any(|(p, b)| p == "/agent/poll" && b["capacity"] == 2 && b["wait_ms"] == 25_000));

        // Heartbeats carry the agent's figures besides the machine's.
        let heartbeat = calls
            .iter()
            .find(|(p, _)| p == "/agent/heartbeat")
            .map(|(_, b)| b["inventory"].clone())
            .unwrap();
        assert_eq!(heartbeat["capacity"], 2);
        // Docker is allowed but off: only what the agent accepts is said.
        assert_eq!(heartbeat["sandboxes"], json!(["process"]));
        assert!(heartbeat["running"].is_u64(), "{heartbeat}");
        // Docker is off: no engine status at all.
        assert!(heartbeat.get("docker").is_none(), "{heartbeat}");

        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(10), agent)
            .await
            .expect("agent stops")
            .unwrap();
        assert!(stopped.is_ok(), "{stopped:?}");
        assert!(outbox.is_empty());
    });
}

/// A forced stop from the poll reaches a running attempt at once, even
/// while a graceful cancel waits out a long grace.
#[test]
fn forced_kill_from_the_poll_reaches_a_running_attempt() {
    rt().block_on(async {
        let fake: Shared = Arc::default();
        let url = start_fake(fake.clone()).await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        dir.save_credentials(&credentials(&url)).unwrap();
        let mut a = assignment(
            "k-1",
            "stubborn",
            &["sh", "-c", "trap '' TERM; echo up; sleep 100; sleep 100"],
        );
        a.kill_grace_ms = 60_000;
        fake.lock().unwrap().assignments.push_back(a);
        let config = AgentConfig {
            server: None,
            state_dir: tmp.path().to_owned(),
            log_format: crate::config::LogFormat::Human,
            log_level: String::new(),
            max_backoff: Duration::from_secs(2),
            allow_actions: vec!["*".into()],
            capacity: 1,
            metrics_listen: None,
            docker_host: crate::config::DockerHost::Off,
            allow_sandboxes: vec![crate::config::SandboxKind::Process],
            workspace_local_roots: Vec::new(),
            pin: None,
        };
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { crate::run(&config, shutdown).await }
        });
        wait_until("k-1 output", || {
            fake.lock()
                .unwrap()
                .calls
                .iter()
                .any(|(p, _)| p == "/agent/attempts/k-1/logs")
        })
        .await;
        // A graceful cancel: the program ignores SIGTERM and the grace is
        // a minute long.
        fake.lock().unwrap().cancels.push("k-1".into());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(results(&fake).is_empty(), "ended before the grace");
        // The forced stop does not wait for it.
        let killed_at = std::time::Instant::now();
        {
            let mut f = fake.lock().unwrap();
            f.cancels.push("k-1".into());
            f.kills.push("k-1".into());
        }
        wait_until("k-1 result", || !results(&fake).is_empty()).await;
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "{:?}",
            killed_at.elapsed()
        );
        let r = results(&fake).remove(0);
        assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.signal, Some(libc::SIGKILL), "{r:?}");
        assert_eq!(
            r.error.as_deref(),
            Some("cancelled: killed at once (forced stop)")
        );
        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(10), agent)
            .await
            .expect("agent stops")
            .unwrap();
        assert!(stopped.is_ok(), "{stopped:?}");
    });
}
