//! Signed assignments (issue 13, point 7): the server signs what each job
//! runs when it is created and every hand-out of it; the agent refuses
//! what does not verify. Real processes on both engines; the database is
//! edited behind the server's back, with the sqlite3 CLI or SQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use drover_proto::jobs::JobState;
use drover_proto::signing;
use drover_store::testing::TestDb;
use drover_tests::*;

const CATALOG: &str = r#"
sandboxes:
  - name: limited
    type: process
    cpu_time: 30s
    open_files: 64
    address_space: 512m
actions:
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: limited-env
    argv: ["/bin/sh", "-c", "echo \"$GREETING\""]
    env: {GREETING: "hello from a sandbox"}
    sandbox: limited
    timeout: 1m 30s
    kill_grace: 1500ms
"#;

/// Runs one SQL statement on the server's database, as an intruder with
/// write access to it would: the sqlite3 CLI for SQLite, a plain
/// connection for PostgreSQL.
async fn tamper(db: &TestDb, sql: &str) {
    match db.backend {
        Backend::Sqlite => {
            let path = db.url.trim_start_matches("sqlite://");
            let out = std::process::Command::new("sqlite3")
                .args(["-cmd", ".timeout 10000", path, sql])
                .output()
                .expect("run sqlite3 (apt-get install sqlite3)");
            assert!(
                out.status.success(),
                "sqlite3: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&db.url)
                .await
                .expect("connect to the server's database");
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .expect("tamper statement");
            let _ = conn.close().await;
        }
    }
}

/// The public key the server's `assignment.key` makes.
fn server_public_key(data_dir: &Path) -> String {
    let seed = std::fs::read_to_string(data_dir.join("assignment.key")).expect("assignment.key");
    let seed = signing::from_hex::<32>(seed.trim()).expect("64 hex digits");
    signing::public_key_hex(&signing::Signer::from_seed(&seed).public_key())
}

fn agent_key(agent: &AgentProc) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(agent.state_dir().join("assignment-key.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// A job runs with its signatures checked; a queued job whose argv (or
/// whose stored signature) was edited in the database is refused by the
/// agent, `rejected` with the reason, and the edited command never runs; an
/// agent enrolled before the server signed learns the key from a heartbeat.
#[tokio::test]
async fn the_agent_refuses_an_assignment_edited_in_the_database() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let cluster = Cluster::start_with(
            backend,
            ServerOptions {
                database_url: Some(db.url.clone()),
                ..ServerOptions::default()
            },
        )
        .await;
        cluster.apply_actions(CATALOG);
        let mut agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;

        // The key is created private and told to the agent at enrollment.
        let key = server_public_key(&cluster.data_dir());
        let stored = agent_key(&agent).expect("the agent keeps the key");
        assert_eq!(stored["public_key"], key.as_str(), "{backend}");
        assert_eq!(stored["learned_from"], "enrollment", "{backend}");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cluster.data_dir().join("assignment.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{backend}");
        }

        // A normal job: signed, verified, run.
        let ok = cluster.submit("echo", &agent.id, &["--param", "message=signed"]);
        let job = cluster.wait_job(&ok, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:?}");
        // A sandbox with limits, an environment and odd durations survive
        // the database and the wire byte for byte.
        let limited = cluster.submit("limited-env", &agent.id, &[]);
        let job = cluster.wait_job(&limited, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:?}");

        // With the agent away, two jobs wait in the queue; an intruder
        // rewrites their rows.
        assert!(agent.stop().await.success(), "{backend}");
        let proof = cluster.dir.path().join(format!("ran-{backend}"));
        let proof_text = proof.to_str().expect("utf-8 path");
        let edited = cluster.submit("echo", &agent.id, &["--param", "message=one"]);
        let unsigned = cluster.submit("echo", &agent.id, &["--param", "message=two"]);
        let untouched = cluster.submit("echo", &agent.id, &["--param", "message=three"]);
        let argv = format!(r#"["/usr/bin/touch","{proof_text}"]"#);
        tamper(
            &db,
            &format!("UPDATE jobs SET argv = '{argv}' WHERE id = '{edited}'"),
        )
        .await;
        tamper(
            &db,
            &format!("UPDATE jobs SET argv = '{argv}', spec_sig = NULL WHERE id = '{unsigned}'"),
        )
        .await;
        assert_eq!(cluster.job(&edited).state, JobState::Queued, "{backend}");

        agent.start();
        for (id, reason) in [
            (&edited, "is not what the server signed"),
            (&unsigned, "carries no signature"),
        ] {
            let job = cluster.wait_job(id, Duration::from_secs(20)).await;
            assert_eq!(job.state, JobState::Rejected, "{backend}: {job:?}");
            let attempt = &job.attempts[0];
            assert_eq!(attempt.state, JobState::Rejected, "{backend}");
            let error = attempt.error.as_deref().unwrap_or_default();
            assert!(
                error.starts_with("assignment signature does not verify: ")
                    && error.contains(reason),
                "{backend}: {error}"
            );
            assert_eq!(
                job.attempts.len(),
                1,
                "{backend}: a rejection is not retried"
            );
        }
        let job = cluster.wait_job(&untouched, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:?}");
        assert!(
            !proof.exists(),
            "{backend}: the edited command ran: {} exists",
            proof.display()
        );
        assert!(
            agent.log().contains("refusing an assignment"),
            "{backend}: {}",
            agent.log()
        );

        // An agent enrolled before the server signed (no key kept) learns
        // it from its next heartbeat answer, and keeps it.
        assert!(agent.stop().await.success(), "{backend}");
        std::fs::remove_file(agent.state_dir().join("assignment-key.json")).unwrap();
        agent.start();
        let learned = wait_for("the key from a heartbeat", Duration::from_secs(20), || {
            let k = agent_key(&agent);
            async move { k }
        })
        .await;
        assert_eq!(learned["public_key"], key.as_str(), "{backend}");
        assert_eq!(learned["learned_from"], "heartbeat", "{backend}");
        let after = cluster.submit("echo", &agent.id, &["--param", "message=after"]);
        let job = cluster.wait_job(&after, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:?}");
        assert!(agent.stop().await.success(), "{backend}");
    }
}
