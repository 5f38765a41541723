//! Faults: answers lost on the way back, links cut at random, servers that
//! die mid-request. Real `drover` and `drover-agent` processes on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};

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
    let enrolled = cluster.enroll_over_http().await;
    enrolled["credentials"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn refresh_with(http: &reqwest::Client, base: &str, token: &str) -> (u16, Value) {
    post_json(
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
    post_json(
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
    let mut agent = cluster.agent_via(&proxy.url()).await;

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

// ---- an agent killed while its attempts run (issue 11, point 3) ----

/// An action that works for a while, then appends a line to a marker
/// file: each line is one run that finished its work.
const SURVIVOR_CATALOG: &str = r#"
actions:
  - name: slow-marker
    argv: ["/bin/sh", "-c", "sleep 5; echo done >> \"$1\"", "sh", "{{path}}"]
    params:
      path: {type: string, max_length: 300}
    timeout: 60s
"#;

/// Live members of process group `pgid`, read from /proc (zombies, dead
/// and waiting to be reaped, do not count).
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first().is_some_and(|s| *s != "Z" && *s != "X")
                && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
        })
        .collect()
}

/// The process group of the one attempt the agent records as running:
/// its record is named `<attempt_id>.process.<pid>.<start_ticks>`.
fn recorded_group(agent: &AgentProc) -> Option<i32> {
    let dir = agent.state_dir().join("attempts");
    let mut groups = std::fs::read_dir(dir).ok()?.flatten().filter_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let mut parts = name.rsplitn(4, '.');
        let (_ticks, pid, kind) = (parts.next()?, parts.next()?, parts.next()?);
        (kind == "process").then(|| pid.parse::<i32>().ok())?
    });
    groups.next()
}

/// kill -9 of the agent while a process attempt runs, and an immediate
/// restart: the attempt's process group, which outlived the agent, is
/// killed before it finishes its work; the attempt ends `failed` with
/// "agent restarted" (reported by the agent, not `lost` at the end of its
/// lease), and its one retry runs exactly once.
#[tokio::test]
async fn survivors_of_a_killed_agent_are_stopped_and_reported_failed() {
    for backend in BACKENDS {
        // A lease far longer than the test: only the agent's report can end
        // the first attempt in time.
        let cluster = Cluster::start_with(
            backend,
            ServerOptions {
                extra_args: vec!["--attempt-lease".into(), "60s".into()],
                ..ServerOptions::default()
            },
        )
        .await;
        cluster.apply_actions(SURVIVOR_CATALOG);
        let mut agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        let marker = agent.state.path().join("marker");
        let param = format!("path={}", marker.display());
        let id = cluster.submit(
            "slow-marker",
            &agent.id,
            &["--param", &param, "--retries", "1"],
        );
        let pgid = wait_for("the attempt to run", Duration::from_secs(10), || {
            let running = cluster.job(&id).state == JobState::Running;
            let group = recorded_group(&agent);
            async move { group.filter(|_| running) }
        })
        .await;

        agent.kill();
        assert!(
            !group_members(pgid).is_empty(),
            "{backend}: the attempt's process group should outlive kill -9 of the agent"
        );
        agent.start();

        let first = wait_for("the first attempt to end", Duration::from_secs(20), || {
            let job = cluster.job(&id);
            async move { job.attempts.first().filter(|a| a.state.is_final()).cloned() }
        })
        .await;
        // The agent stops the survivor before it reports the attempt.
        assert_eq!(group_members(pgid), Vec::<i32>::new(), "{backend}");
        assert_eq!(first.state, JobState::Failed, "{backend}: {first:#?}");
        let error = first.error.clone().unwrap_or_default();
        assert!(error.contains("agent restarted"), "{backend}: {error}");

        let job = cluster.wait_job(&id, Duration::from_secs(30)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:#?}");
        let states: Vec<JobState> = job.attempts.iter().map(|a| a.state).collect();
        assert_eq!(
            states,
            [JobState::Failed, JobState::Succeeded],
            "{backend}: {job:#?}"
        );
        // One line: the retry's. The survivor never finished its work.
        let lines = std::fs::read_to_string(&marker).unwrap_or_default();
        assert_eq!(lines, "done\n", "{backend}");
        let log = agent.log();
        assert!(
            log.contains("stopped an attempt a killed agent left running"),
            "{log}"
        );
        assert_eq!(
            std::fs::read_dir(agent.state_dir().join("attempts"))
                .map(|d| d.count())
                .unwrap_or(0),
            0,
            "{backend}: records outlived their attempts"
        );
    }
}

/// The container variant: kill -9 of the agent while an attempt runs in a
/// container of its own, and an immediate restart: the container is
/// removed, the attempt ends `failed` with "agent restarted", and its one
/// retry runs exactly once.
#[tokio::test]
async fn survivor_containers_of_a_killed_agent_are_removed_and_reported_failed() {
    let catalog = format!(
        r#"
sandboxes:
  - name: boxed
    type: docker
    image: {}
actions:
  - name: boxed-sleep
    argv: ["/bin/sleep", "{{{{seconds}}}}"]
    params:
      seconds: {{type: integer, min: 0, max: 600}}
    sandbox: boxed
    timeout: 120s
"#,
        docker_image()
    );
    for backend in BACKENDS {
        let cluster = Cluster::start_with(
            backend,
            ServerOptions {
                extra_args: vec!["--attempt-lease".into(), "60s".into()],
                ..ServerOptions::default()
            },
        )
        .await;
        cluster.apply_actions(&catalog);
        let mut agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;
        let id = cluster.submit(
            "boxed-sleep",
            &agent.id,
            &["--param", "seconds=4", "--retries", "1"],
        );
        let first = wait_for("the container to run", Duration::from_secs(30), || {
            let job = cluster.job(&id);
            async move {
                let a = job.attempts.first()?;
                let name = format!("name=drover-{}", a.id);
                let running = !docker(&["ps", "-q", "--filter", &name]).trim().is_empty();
                running.then(|| a.id.clone())
            }
        })
        .await;
        let name = format!("name=drover-{first}");

        agent.kill();
        assert!(
            !docker(&["ps", "-q", "--filter", &name]).trim().is_empty(),
            "{backend}: the container should outlive kill -9 of the agent"
        );
        agent.start();

        let job = cluster.wait_job(&id, Duration::from_secs(60)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:#?}");
        let states: Vec<JobState> = job.attempts.iter().map(|a| a.state).collect();
        assert_eq!(
            states,
            [JobState::Failed, JobState::Succeeded],
            "{backend}: {job:#?}"
        );
        let error = job.attempts[0].error.clone().unwrap_or_default();
        assert!(error.contains("agent restarted"), "{backend}: {error}");
        assert_eq!(
            docker(&["ps", "-aq", "--filter", &name]).trim(),
            "",
            "{backend}: the first attempt's container is still there"
        );
    }
}
