//! Faults: answers lost on the way back, links cut at random, servers that
//! die mid-request. Real `drover` and `drover-agent` processes on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};

async fn refresh_post(
    http: &reqwest::Client,
    url: String,
    bearer: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = http.post(url).json(&body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn refresh_heartbeat_body() -> Value {
    json!({"inventory": {
        "hostname": "h", "os": "linux", "os_version": "1", "kernel": "6", "arch": "x86_64",
        "cpu_count": 1, "load_avg": [0.0, 0.0, 0.0], "memory_total_bytes": 1, "memory_used_bytes": 1,
        "disk_total_bytes": 1, "disk_available_bytes": 1, "agent_version": "0.1.0",
        "agent_uptime_secs": 1, "system_uptime_secs": 1
    }})
}

/// Enrolls over HTTP; returns the first refresh token.
async fn refresh_enroll(cluster: &Cluster) -> String {
    let token = cluster.bootstrap_token(&[]);
    let (code, enrolled) = refresh_post(
        &cluster.http,
        format!("{}/api/v1/agent/enroll", cluster.url),
        None,
        json!({"token": token, "hostname": "h", "agent_version": "0.1.0"}),
    )
    .await;
    assert_eq!(code, 200, "{enrolled}");
    enrolled["credentials"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn refresh_with(http: &reqwest::Client, base: &str, token: &str) -> (u16, Value) {
    refresh_post(
        http,
        format!("{base}/api/v1/agent/refresh"),
        None,
        json!({"refresh_token": token}),
    )
    .await
}

fn refresh_token_of(credentials: &Value) -> String {
    credentials["refresh_token"].as_str().unwrap().to_owned()
}

async fn refresh_heartbeat(http: &reqwest::Client, base: &str, credentials: &Value) -> u16 {
    let access = credentials["access_token"].as_str().unwrap();
    refresh_post(
        http,
        format!("{base}/api/v1/agent/heartbeat"),
        Some(access),
        refresh_heartbeat_body(),
    )
    .await
    .0
}

/// The answer to a rotation is lost (or the server died before sending it):
/// the agent presents the same refresh token again and gets the same new
/// refresh token, with a working access token — as often as it takes, from
/// any replica, even several at once. Once the new token is used, the old
/// one is reuse again and ends the session.
#[tokio::test]
async fn refresh_lost_answer_returns_the_same_pair() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        // Replicas share PostgreSQL; a SQLite file has one server.
        let replica = match backend {
            Backend::Postgres => Some(cluster.start_replica().await),
            Backend::Sqlite => None,
        };
        let other = replica.as_ref().map_or(cluster.url.as_str(), |r| &r.url);
        let http = &cluster.http;
        let r0 = refresh_enroll(&cluster).await;

        let (code, c1) = refresh_with(http, &cluster.url, &r0).await;
        assert_eq!(code, 200, "{backend}: {c1}");
        let r1 = refresh_token_of(&c1);
        assert_ne!(r0, r1);
        // The answer is lost: the same token again, here and elsewhere.
        let (code, again) = refresh_with(http, other, &r0).await;
        assert_eq!(code, 200, "{backend}: {again}");
        assert_eq!(refresh_token_of(&again), r1, "{backend}");
        assert_eq!(refresh_heartbeat(http, other, &again).await, 200);
        let (a, b, c) = tokio::join!(
            refresh_with(http, &cluster.url, &r0),
            refresh_with(http, other, &r0),
            refresh_with(http, &cluster.url, &r0),
        );
        for (code, creds) in [a, b, c] {
            assert_eq!(code, 200, "{backend}: {creds}");
            assert_eq!(refresh_token_of(&creds), r1, "{backend}");
        }

        // The new token works and moves the session on.
        let (code, c2) = refresh_with(http, &cluster.url, &r1).await;
        assert_eq!(code, 200, "{backend}: {c2}");
        assert_eq!(refresh_heartbeat(http, &cluster.url, &c2).await, 200);
        // Now r0 is an old token whose successor was used: reuse.
        let (code, reuse) = refresh_with(http, other, &r0).await;
        assert_eq!(
            (code, reuse["error"]["code"].as_str()),
            (401, Some("refresh_token_reused")),
            "{backend}: {reuse}"
        );
        let (code, after) = refresh_with(http, &cluster.url, &refresh_token_of(&c2)).await;
        assert_eq!(
            (code, after["error"]["code"].as_str()),
            (401, Some("session_revoked")),
            "{backend}: {after}"
        );
        assert_eq!(refresh_heartbeat(http, &cluster.url, &c2).await, 401);
    }
}

/// Past `agent_refresh_grace`, presenting the previous token again is reuse
/// even though its successor was never used.
#[tokio::test]
async fn refresh_after_the_grace_is_reuse() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--agent-refresh-grace".into(), "1s".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let http = &cluster.http;
    let r0 = refresh_enroll(&cluster).await;
    let (code, c1) = refresh_with(http, &cluster.url, &r0).await;
    assert_eq!(code, 200, "{c1}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, reuse) = refresh_with(http, &cluster.url, &r0).await;
    assert_eq!(
        (code, reuse["error"]["code"].as_str()),
        (401, Some("refresh_token_reused")),
        "{reuse}"
    );
    let (code, after) = refresh_with(http, &cluster.url, &refresh_token_of(&c1)).await;
    assert_eq!(
        (code, after["error"]["code"].as_str()),
        (401, Some("session_revoked")),
        "{after}"
    );
}

/// The server saves a rotation but the agent never sees the answer (here the
/// agent is killed and the test trades its token, as the lost request did):
/// restarted, the agent presents the old token, gets the same new one and
/// carries on, refreshing a 2 s access token as before.
#[tokio::test]
async fn refresh_agent_carries_on_after_its_rotation_answer_was_lost() {
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
    agent.kill();
    let stored: Value =
        serde_json::from_slice(&std::fs::read(agent.state_dir().join("credentials.json")).unwrap())
            .unwrap();
    let old = stored["refresh_token"].as_str().unwrap();
    let (code, lost) = refresh_with(&cluster.http, &cluster.url, old).await;
    assert_eq!(code, 200, "{lost}");

    // Its stored access token is past its refresh point once restarted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = chrono::Utc::now();
    agent.start();
    cluster.wait_seen_after(&agent.id, restarted).await;
    let log = std::fs::read_to_string(cluster.server_log(1)).unwrap();
    assert!(log.contains("the answer was lost"), "{log}");
    // It keeps refreshing from the successor it was handed again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = chrono::Utc::now();
    let seen = cluster.wait_seen_after(&agent.id, later).await;
    assert_eq!(seen.status, AgentStatus::Online, "{seen:?}");
    assert!(agent.is_running(), "{}", agent.log());
    let log = std::fs::read_to_string(cluster.server_log(1)).unwrap();
    assert!(!log.contains("refresh token reused"), "{log}");
}

/// A small xorshift: random enough for cut timings, seeded and printed so a
/// failing run can be replayed.
struct RefreshRng(u64);

impl RefreshRng {
    fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

/// An agent with a 1 s access token, behind a link cut at random many short
/// times for 16 s (a cut may land between a rotation and its answer): it
/// keeps running, is online once the link is back, and runs a job.
#[tokio::test]
async fn refresh_survives_a_link_cut_at_random() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            agent_access_ttl: Some("1s"),
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions(
        "actions:\n  - name: echo\n    argv: [\"/bin/echo\", \"{{message}}\"]\n    params:\n      message: {type: string, max_length: 100}\n",
    );
    let proxy = Proxy::start(cluster.port).await;
    let token = cluster.bootstrap_token(&[]);
    let mut agent = AgentProc::new(&proxy.url());
    let out = agent
        .command(&["enroll", "--token", &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    agent.start();
    cluster.wait_online(&agent.id).await;

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("cut timings seed: {seed}");
    let mut rng = RefreshRng(seed);
    let started = Instant::now();
    let mut cuts = 0;
    while started.elapsed() < Duration::from_secs(16) {
        tokio::time::sleep(rng.between_ms(20, 300)).await;
        proxy.cut();
        cuts += 1;
        tokio::time::sleep(rng.between_ms(10, 150)).await;
        proxy.restore();
        assert!(
            agent.is_running(),
            "the agent exited after {cuts} cuts (seed {seed}):\n{}",
            agent.log()
        );
    }
    let restored = chrono::Utc::now();
    let server_log = std::fs::read_to_string(cluster.server_log(1)).unwrap_or_default();
    eprintln!(
        "{cuts} cuts; answers lost and handed out again: {}",
        server_log.matches("the answer was lost").count()
    );
    assert!(
        !server_log.contains("refresh token reused"),
        "seed {seed}: {server_log}"
    );

    let seen = cluster.wait_seen_after(&agent.id, restored).await;
    assert_eq!(seen.status, AgentStatus::Online, "{seen:?}");
    let id = cluster.submit("echo", &agent.id, &["--param", "message=still-here"]);
    let job = cluster.wait_job(&id, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(cluster.cli_ok(&["jobs", "logs", &id]), "still-here\n");
    assert!(agent.is_running(), "{}", agent.log());
    assert!(agent.status()["credentials_rejected"].is_null());
}
