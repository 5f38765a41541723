//! Operating Drover (issue 14): a server that cannot listen changes
//! nothing, a lost admin password reset offline, one agent per state dir,
//! plain-text logs in files, and docker images an engine lacks explained.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use drover_tests::*;

/// `drover server` on `listen` with its own data dir and database, without
/// DROVER_ADMIN_PASSWORD, in the human log format; stderr to `log`.
fn server(data_dir: &Path, database_url: &str, listen: &str, log: &Path) -> Command {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(["server", "--listen", listen])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--database-url", database_url])
        .args(["--log-format", "human"])
        .env_remove("DROVER_ADMIN_PASSWORD")
        .env_remove("DROVER_CONFIG")
        .env_remove("NO_COLOR")
        .current_dir(data_dir.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    cmd
}

/// Waits for `what` in the file at `path`; returns the whole text.
async fn wait_text(path: &Path, what: &str) -> String {
    let what = what.to_owned();
    wait_for(
        &format!("'{what}' in {}", path.display()),
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let found = text.contains(what.as_str());
            async move { found.then_some(text) }
        },
    )
    .await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Issue 14, point 7: on a busy port the server exits naming the address,
/// before creating the admin (no password printed) or anything in the
/// data dir; on a free port the first start then creates the admin.
/// Point 15: its log, redirected to a file, has no ANSI colours.
#[tokio::test]
async fn a_server_on_a_busy_port_creates_nothing_and_says_why() {
    for backend in BACKENDS {
        let db = TestDb::new(backend).await;
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_addr = busy.local_addr().unwrap().to_string();
        let log = tmp.path().join("busy.log");
        let mut child = server(&data_dir, &db.url, &busy_addr, &log)
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(20)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "{backend}: {text}");
        assert!(
            text.contains(&format!(
                "error: cannot listen on {busy_addr}: the address is already in use"
            )),
            "{backend}: {text}"
        );
        assert!(!text.contains("password"), "{backend}: {text}");
        assert!(!data_dir.exists(), "{backend}: the data dir was created");
        // The database has no user: the next start is a first start.
        let free = format!("127.0.0.1:{}", free_port());
        let log = tmp.path().join("first.log");
        let mut child: Child = server(&data_dir, &db.url, &free, &log).spawn().unwrap();
        wait_text(&log, "Created user 'admin' with password: ").await;
        let text = wait_text(&log, "listening").await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !text.contains('\x1b'),
            "{backend}: colours in a file:\n{text}"
        );
        assert!(text.contains(" INFO "), "{backend}: {text}");
        drop(busy);
    }
}

/// `drover admin reset-password`, its new password on standard input.
fn reset_password(cluster: &Cluster, password: &str) -> Output {
    let mut child = Command::new(bin("drover"))
        .args(["admin", "reset-password", "--password-stdin"])
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .args(["--database-url", cluster.database_url()])
        .env_remove("DROVER_ADMIN_PASSWORD")
        .env_remove("DROVER_CONFIG")
        .current_dir(cluster.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{password}").unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Issue 14, point 7: a lost admin password is reset offline; the old
/// password and the sessions made with it stop working, the new one logs
/// in, and the audit log says so. On SQLite it refuses while the server
/// runs. DROVER_ADMIN_PASSWORD on a later start is ignored with a warning.
#[tokio::test]
async fn reset_password_offline_replaces_the_admin_password() {
    for backend in BACKENDS {
        let mut cluster = Cluster::start(backend).await;
        let old_session = cluster.admin_token.clone();
        if backend == Backend::Sqlite {
            let out = reset_password(&cluster, "a-new-password-1");
            let err = stderr(&out);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains(&format!(
                    "a drover server (pid {}) is running on the data dir {}: stop it first",
                    cluster.server_pid(),
                    cluster.data_dir().display()
                )),
                "{err}"
            );
        }
        assert!(cluster.stop_server().await.success());
        // The password rules of the API.
        let out = reset_password(&cluster, "short");
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("password: at least"),
            "{}",
            stderr(&out)
        );

        let out = reset_password(&cluster, "a-new-password-1");
        let err = stderr(&out);
        assert!(out.status.success(), "{backend}: {err}");
        assert!(
            err.contains("password of 'admin' set in ") && err.contains("1 session(s) ended"),
            "{backend}: {err}"
        );

        // The cluster starts its server with DROVER_ADMIN_PASSWORD (the
        // old password) set: it is ignored, and the log says so.
        cluster.start_server().await;
        let log = std::fs::read_to_string(cluster.server_log(2)).unwrap();
        assert!(
            log.contains(
                "DROVER_ADMIN_PASSWORD is set but was ignored: the admin user exists already"
            ) && log.contains("drover admin reset-password --data-dir"),
            "{backend}: {log}"
        );
        assert!(
            cluster.login(ADMIN_PASSWORD).await.is_err(),
            "{backend}: the old password still works"
        );
        // The session made with the old password ended.
        let out = cluster
            .cli_command(&["agents", "list"])
            .env("DROVER_TOKEN", &old_session)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{backend}: the old session still works"
        );
        cluster.admin_token = cluster
            .login("a-new-password-1")
            .await
            .unwrap_or_else(|e| panic!("{backend}: the new password: {e}"));
        let audit: Vec<serde_json::Value> =
            cluster.cli_json(&["audit", "list", "--action", "user.reset-password"]);
        assert_eq!(audit.len(), 1, "{backend}: {audit:?}");
        assert_eq!(audit[0]["target"], "user:admin", "{backend}: {audit:?}");
        assert_eq!(
            audit[0]["detail"]["sessions_ended"], "1",
            "{backend}: {audit:?}"
        );
    }
}

/// A `drover-agent` command on `state_dir` against `server`.
fn agent_command(state_dir: &Path, config: &Path, server: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.arg("--state-dir")
        .arg(state_dir)
        .args(["--max-backoff", "2s"])
        .args(args)
        .env("DROVER_AGENT_SERVER", server)
        .env("DROVER_AGENT_CONFIG", config)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    cmd
}

/// Issue 14, point 8: a second agent on a running agent's state dir (run
/// or enroll) exits at once naming the dir and the holder's pid; the first
/// stays online and keeps running jobs. Point 15: the agent's human log in
/// a file has no colours.
#[tokio::test]
async fn a_second_agent_on_one_state_dir_is_refused() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(
        "actions:\n  - name: echo\n    argv: [\"/bin/echo\", \"{{message}}\"]\n    params:\n      message: {type: string, max_length: 50}\n",
    );
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("state");
    let config = tmp.path().join("agent.yaml");
    std::fs::write(&config, DEFAULT_AGENT_YAML).unwrap();
    let token = cluster.bootstrap_token(&[]);
    let first_log = tmp.path().join("first.log");
    let mut first = agent_command(
        &state_dir,
        &config,
        &cluster.url,
        &["--log-format", "human", "run", "--token", &token],
    )
    .stdout(Stdio::null())
    .stderr(File::create(&first_log).unwrap())
    .spawn()
    .unwrap();
    let agent_id = wait_for("the agent enrolled", Duration::from_secs(20), || {
        let agents = cluster.agents();
        async move { agents.first().map(|a| a.id.clone()) }
    })
    .await;
    cluster.wait_online(&agent_id).await;

    let expected = format!(
        "another drover-agent (pid {}) is using the state dir {}",
        first.id(),
        state_dir.display()
    );
    for args in [
        &["run"][..],
        &["enroll", "--token", "drv_b_unused", "--force"][..],
    ] {
        let mut second = agent_command(&state_dir, &config, &cluster.url, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut second, Duration::from_secs(10)).await;
        let mut err = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?}: {err}");
        assert!(err.contains(&expected), "{args:?}: {err}");
    }

    // The first agent goes on: heartbeats, and a job.
    let mark = chrono::Utc::now();
    cluster.wait_seen_after(&agent_id, mark).await;
    let job = cluster.submit("echo", &agent_id, &["--param", "message=still-here"]);
    let job = cluster.wait_job(&job, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert!(
        matches!(first.try_wait(), Ok(None)),
        "the first agent exited"
    );
    assert_eq!(cluster.agent(&agent_id).status, AgentStatus::Online);

    let _ = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    wait_exit(&mut first, Duration::from_secs(15)).await;
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert!(!log.contains("reuse"), "{log}");
    assert!(!log.contains('\x1b'), "colours in a file:\n{log}");
    assert!(log.contains(" INFO "), "{log}");
}

/// Issue 14, point 15: a failed webhook delivery logs its error as text,
/// not as `Some("…")`.
#[tokio::test]
async fn webhook_failures_log_the_error_as_text() {
    // Nothing listens on the receiver's port: every delivery fails.
    let port = free_port();
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec![
                "--webhook-allow".into(),
                "127.0.0.1".into(),
                "--webhook-backoff".into(),
                "100ms".into(),
                "--webhook-max-attempts".into(),
                "2".into(),
            ],
            ..ServerOptions::default()
        },
    )
    .await;
    cluster.apply_actions("actions:\n  - name: do-nothing\n    argv: [\"/bin/true\"]\n");
    let _agent = cluster.enroll_agent(&["--label", "role=hook"]).await;
    let yaml = format!(
        "name: hooked\ndefaults: {{target: 'role=hook'}}\nwebhooks:\n  - url: http://127.0.0.1:{port}/hook\ntasks:\n  - {{id: a, action: do-nothing}}\n"
    );
    let file: PathBuf = cluster.dir.path().join("hooked.yaml");
    std::fs::write(&file, yaml).unwrap();
    cluster.cli_ok(&["workflow", "submit", "-f", file.to_str().unwrap()]);
    let log = wait_text(&cluster.server_log(1), "webhook failed; giving up").await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("webhook failed"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let error = event["fields"]["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty() && !error.starts_with("Some("), "{line}");
    }
}

/// The catalog of the image tests: two profiles of an image no engine has,
/// one that may not be pulled and one whose pull cannot succeed (its
/// registry is a closed loopback port, so it fails at once).
fn absent_image_catalog(never: &str, missing: &str) -> String {
    format!(
        r#"
sandboxes:
  - name: never
    type: docker
    image: {never}
    pull: never
  - name: missing
    type: docker
    image: {missing}
    pull: missing
actions:
  - name: in-never
    argv: ["/bin/true"]
    sandbox: never
    timeout: 60s
  - name: in-missing
    argv: ["/bin/true"]
    sandbox: missing
    timeout: 60s
"#
    )
}

/// Issue 14, point 17: an image the agent's engine lacks fails the job
/// with what to do — at once with `pull: never`, after the failed pull
/// with `pull: missing` — in `drover jobs show`.
#[tokio::test]
async fn an_image_the_engine_lacks_fails_with_how_to_provide_it() {
    // The engine must answer, as for every sandbox test.
    docker_image();
    let cluster = Cluster::start(Backend::Sqlite).await;
    let n = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let never = format!("drover-test/absent:{n}");
    let missing = format!("127.0.0.1:9/drover-test/absent:{n}");
    cluster.apply_actions(&absent_image_catalog(&never, &missing));
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;

    let job = cluster.submit("in-never", &agent.id, &[]);
    let done = cluster.wait_job(&job, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let shown = cluster.cli_ok(&["jobs", "show", &job]);
    assert!(
        shown.contains(&format!(
            "image '{never}' is not present on this agent's Docker engine and the sandbox's pull policy is never"
        )) && shown.contains("docker load"),
        "{shown}"
    );
    assert!(!shown.contains("pulling image"), "{shown}");

    let job = cluster.submit("in-missing", &agent.id, &[]);
    let done = cluster.wait_job(&job, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let shown = cluster.cli_ok(&["jobs", "show", &job]);
    assert!(
        shown.contains(&format!(
            "image '{missing}' is not present on this agent's Docker engine and could not be pulled ("
        )) && shown.contains("docker load")
            && shown.contains("pull: never"),
        "{shown}"
    );
}
