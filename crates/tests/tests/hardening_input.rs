//! Hardening against hostile input (issue 12): the rule that keeps free
//! text out of code, options smuggled in as values, and protocol bounds
//! the server enforces whatever the agent sends. Real processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use drover_proto::jobs::JobState;
use drover_tests::*;
use serde_json::{json, Value};

/// The shell-guard bypasses of the attack pass (`sh -ec`, `sh -c --`,
/// `python3 -Sc`) and any other embedding of free text are refused when the
/// catalog is applied, naming the element; the safe form runs the hostile
/// value as one literal argument; a value that would be read as an option
/// is refused unless the parameter allows it.
#[tokio::test]
async fn free_text_never_becomes_code_or_an_option() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let refuse = |yaml: &str, want: &str| {
        let path = cluster.dir.path().join("catalog.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = cluster.cli(&["actions", "apply", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{yaml} was accepted");
        assert!(stderr.contains(want), "{yaml}: {stderr}");
    };
    for argv in [
        r#"["/bin/sh", "-ec", "echo {{msg}}"]"#,
        r#"["/bin/sh", "-c", "--", "echo {{msg}}"]"#,
        r#"["/usr/bin/python3", "-Sc", "print('{{msg}}')"]"#,
        r#"["/bin/echo", "prefix-{{msg}}"]"#,
    ] {
        refuse(
            &format!("actions:\n  - name: greet\n    argv: {argv}\n    params: {{msg: {{type: string}}}}\n"),
            "string parameter 'msg' is embedded in a larger argument",
        );
    }
    // A loose pattern does not make free text embeddable.
    refuse(
        "actions:\n  - name: greet\n    argv: [\"/bin/sh\", \"-c\", \"echo {{msg}}\"]\n    params: {msg: {type: string, pattern: \"[^;]*\"}}\n",
        "is embedded in a larger argument",
    );
    // Nothing of a refused catalog was stored.
    let listed = cluster.cli_ok(&["actions", "list"]);
    assert!(!listed.contains("greet"), "{listed}");

    cluster.apply_actions(
        r#"
actions:
  - name: greet
    argv: ["/bin/sh", "-ec", "echo \"$1\"", "sh", "{{msg}}"]
    params:
      msg: {type: string, max_length: 200}
  - name: tag
    argv: ["/bin/echo", "v-{{tag}}"]
    params:
      tag: {type: string, pattern: "[a-z0-9.]{1,20}"}
  - name: flags
    argv: ["/bin/echo", "{{arg}}"]
    params:
      arg: {type: string, allow_leading_dash: true}
"#,
    );
    let agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    let run = |action: &str, param: &str| {
        cluster.cli(&[
            "run", action, "--target", &agent.id, "--param", param, "--follow",
        ])
    };
    let out = run("greet", "msg=hi; id; $(id) `id`");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi; id; $(id) `id`\n",
        "the value is one literal argument"
    );
    let out = run("tag", "tag=1.2.3");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v-1.2.3\n");
    let out = run("tag", "tag=1;id");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match the pattern"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `--help` would be an option of echo: refused, and no job created.
    let before = cluster.cli_ok(&["jobs", "list"]).lines().count();
    let out = run("greet", "msg=--help");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("parameter 'msg' begins with '-'"),
        "{stderr}"
    );
    assert_eq!(cluster.cli_ok(&["jobs", "list"]).lines().count(), before);
    // Unless the parameter allows it.
    let out = run("flags", "arg=-n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = cluster.submit("flags", &agent.id, &["--param", "arg=-e"]);
    let job = cluster.wait_job(&id, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Succeeded);
}

/// The server enforces the protocol's bounds itself: a result with 10,000
/// outputs (the agent's own limit is 64), an output too long or badly
/// named, or a lease renewal listing more attempts than allowed, is
/// refused with a message naming the bound, and nothing is stored.
#[tokio::test]
async fn the_server_enforces_protocol_bounds_an_agent_could_break() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let enrolled = cluster.enroll_over_http().await;
    let access = enrolled["credentials"]["access_token"].as_str().unwrap();
    let result = |outputs: Value| {
        json!({
            "attempt_id": "a-1", "outcome": "succeeded", "exit_code": 0, "signal": null,
            "started_at": null, "finished_at": "2026-11-30T00:00:00Z", "duration_ms": 1,
            "error": null, "stdout_truncated": false, "stderr_truncated": false,
            "outputs": outputs,
        })
    };
    let url = format!("{}/api/v1/agent/attempts/a-1/result", cluster.url);
    let many: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| (format!("o{i}"), Value::String("x".into())))
        .collect();
    let (code, body) = post_json(
        &cluster.http,
        url.clone(),
        Some(access),
        result(Value::Object(many)),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outputs has 10000 entries; at most 64"),
        "{body}"
    );
    let (code, body) = post_json(
        &cluster.http,
        url.clone(),
        Some(access),
        result(json!({"big": "x".repeat(20_000)})),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("at most 16384"), "{body}");
    let (code, body) = post_json(
        &cluster.http,
        url.clone(),
        Some(access),
        result(json!({"bad name;": "x"})),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("is invalid"), "{body}");
    // Within the bounds, an unknown attempt is a 404 (the check came first).
    let (code, _) = post_json(&cluster.http, url, Some(access), result(json!({"ok": "1"}))).await;
    assert_eq!(code, 404);

    // Lease renewals: finished attempts whose result waits count too, up
    // to the bound of known attempts, and no further.
    let leases = format!("{}/api/v1/agent/leases", cluster.url);
    let ids = |n: usize| (0..n).map(|i| format!("x-{i}")).collect::<Vec<_>>();
    let (code, body) = post_json(
        &cluster.http,
        leases.clone(),
        Some(access),
        json!({"attempt_ids": ids(300)}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post_json(
        &cluster.http,
        leases,
        Some(access),
        json!({"attempt_ids": ids(1001)}),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body.to_string()
            .contains("at most 1000 attempts per renewal"),
        "{body}"
    );
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The data dir, the SQLite database (and its WAL files), the signing key
/// and the artifact dir are readable by the server's user only: created
/// so, and corrected with a warning when found open to others.
#[cfg(unix)]
#[tokio::test]
async fn the_servers_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("drover.db");
    let mut cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            database_url: Some(format!("sqlite://{}", db.display())),
            ..ServerOptions::default()
        },
    )
    .await;
    let dir = cluster.data_dir();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&dir.join("signing.key")), 0o600);
    assert_eq!(mode(&dir.join("artifacts")), 0o700);
    let wal = data.path().join("drover.db-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600);
    }

    // An older install left them open: fixed at the next start.
    cluster.stop_server().await;
    for (p, m) in [
        (&dir, 0o755),
        (&db, 0o644),
        (&dir.join("signing.key"), 0o644),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    cluster.start_server().await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&dir.join("signing.key")), 0o600);
    let log = std::fs::read_to_string(cluster.server_log(2)).unwrap();
    assert!(
        log.contains("was readable by other local users; made private"),
        "{log}"
    );
}

/// Webhooks cannot be pointed inside: loopback (also the server's own
/// API), link-local cloud metadata, private and unspecified addresses are
/// refused however the URL spells them, for global webhooks and those of a
/// definition, unless `webhook_allow` lists them; credentials in a URL are
/// never shown back.
#[tokio::test]
async fn webhooks_cannot_reach_inside() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let add = |url: &str| {
        cluster.cli(&[
            "webhooks",
            "add",
            "--url",
            url,
            "--secret",
            "0123456789abcdef-secret",
        ])
    };
    let own = format!("http://127.0.0.1:{}/api/v1/jobs", cluster.port);
    for (url, kind) in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        (own.as_str(), "loopback"),
        ("http://[::1]:9/", "loopback"),
        ("http://0.0.0.0:9/", "unspecified"),
        ("http://2130706433:9/", "loopback"),
        ("http://10.0.0.7/hook", "private"),
        ("http://localhost:9/", "loopback"),
    ] {
        let out = add(url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} was accepted");
        assert!(stderr.contains(kind), "{url}: {stderr}");
    }
    let listed = cluster.cli_ok(&["webhooks", "list"]);
    assert!(!listed.contains("169.254"), "{listed}");

    // A definition's webhook is checked when the run is submitted.
    cluster.apply_actions("actions:\n  - name: nothing\n    argv: [\"builtin:noop\"]\n");
    let path = cluster.dir.path().join("hooked.yaml");
    std::fs::write(
        &path,
        "name: hooked\ndefaults: {target: '*'}\nwebhooks:\n  - url: http://169.254.169.254/x\ntasks:\n  - {id: a, action: noop}\n",
    )
    .unwrap();
    let out = cluster.cli(&["workflow", "submit", "-f", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("webhooks[0]") && stderr.contains("link-local"),
        "{stderr}"
    );

    // Public targets are fine; their credentials are never shown.
    let out = add("https://user:hunter2@hooks.example.com/x");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2"));
    let listed = cluster.cli_ok(&["webhooks", "list", "-o", "json"]);
    assert!(!listed.contains("hunter2"), "{listed}");
    assert!(listed.contains("***@hooks.example.com"), "{listed}");
}

/// An operator can allow an internal receiver explicitly.
#[tokio::test]
async fn webhook_allow_opens_a_named_network() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--webhook-allow".into(), "10.0.0.0/8".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let ok = cluster.cli(&[
        "webhooks",
        "add",
        "--url",
        "http://10.0.0.7/hook",
        "--secret",
        "0123456789abcdef-secret",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = cluster.cli(&[
        "webhooks",
        "add",
        "--url",
        "http://192.168.1.1/hook",
        "--secret",
        "0123456789abcdef-secret",
    ]);
    assert!(!refused.status.success());
}

/// Text an agent reports is kept bounded and free of control characters,
/// and the CLI shows any control character as an escape: a heartbeat whose
/// `os` carries a terminal escape and a newline, and whose `kernel` is
/// 100 KB, is stored cut to 256 bytes with the characters replaced.
#[tokio::test]
async fn reported_text_is_bounded_and_cannot_drive_a_terminal() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let enrolled = cluster.enroll_over_http().await;
    let id = enrolled["agent_id"].as_str().unwrap().to_owned();
    let access = enrolled["credentials"]["access_token"].as_str().unwrap();
    let (code, body) = post_json(
        &cluster.http,
        format!("{}/api/v1/agent/heartbeat", cluster.url),
        Some(access),
        json!({"inventory": {
            "hostname": "h", "os": "Debian\n\u{1b}[2J\u{1b}]0;owned\u{7}", "os_version": "12",
            "kernel": "k".repeat(100_000), "arch": "x86_64", "cpu_count": 1,
            "load_avg": [0.0, 0.0, 0.0], "memory_total_bytes": 1, "memory_used_bytes": 1,
            "disk_total_bytes": 1, "disk_available_bytes": 1, "agent_version": "0.1.0",
            "agent_uptime_secs": 1, "system_uptime_secs": 1
        }}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let agent = cluster.agent(&id);
    let inv = agent.inventory.unwrap();
    assert_eq!(inv.kernel.len(), 256);
    assert!(!inv.os.chars().any(char::is_control), "{:?}", inv.os);
    let shown = cluster.cli_ok(&["agents", "show", &id]);
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
}

/// A client's text cannot forge a line of the server's human-readable
/// log: a login name carrying a newline and an escape sequence is logged
/// inside its own line, escaped.
#[tokio::test]
async fn a_login_name_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut server = std::process::Command::new(bin("drover"))
        .arg("server")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--log-format", "human"])
        .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("HOME", dir.path())
        .env_remove("DROVER_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    wait_for("the server", Duration::from_secs(30), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await;
    let (code, _) = post_json(
        &http,
        format!("{url}/api/v1/auth/login"),
        None,
        json!({"username": "nobody\nFORGED INFO user logged in \u{1b}[2J", "password": "wrong"}),
    )
    .await;
    assert!((400..500).contains(&code), "{code}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = server.kill();
    let _ = server.wait();
    let text = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")),
        "a forged line: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "an escape reached the log: {text:?}"
    );
}

/// A server that refuses a large upload early (413) and closes the
/// connection does not kill the CLI with SIGPIPE: it exits 1 and says why.
#[tokio::test]
async fn a_refused_large_upload_is_reported_not_a_sigpipe() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec!["--max-body-bytes".into(), "4096".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let path = cluster.dir.path().join("big.yaml");
    let mut text = String::from("name: big\ndefaults: {target: '*'}\ntasks:\n");
    // Large enough (65 MB) that the answer comes while the body is still
    // being written (a 3 MB one is read whole first).
    for i in 0..2_000_000 {
        text.push_str(&format!("  - {{id: t{i}, action: noop}}\n"));
    }
    std::fs::write(&path, text).unwrap();
    for _ in 0..3 {
        let out = cluster.cli(&["workflow", "submit", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "killed by a signal? {:?} {stderr}",
            out.status
        );
        assert!(
            stderr.contains("413") || stderr.contains("max_body_bytes"),
            "{stderr}"
        );
    }
}

/// Runs cannot pile up without bound: past `max_active_runs` a submission
/// is refused (503, naming the limit), and a run whose definition sets no
/// timeout ends after `default_run_timeout` — here runs waiting on an
/// offline agent time out, and submissions are taken again.
#[tokio::test]
async fn active_runs_are_capped_and_every_run_ends() {
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            extra_args: vec![
                "--max-active-runs".into(),
                "2".into(),
                "--default-run-timeout".into(),
                "2s".into(),
            ],
            ..ServerOptions::default()
        },
    )
    .await;
    let mut agent = cluster.enroll_agent(&[]).await;
    cluster.wait_online(&agent.id).await;
    agent.stop().await;
    let path = cluster.dir.path().join("wait.yaml");
    std::fs::write(
        &path,
        format!(
            "name: wait\ntasks:\n  - {{id: a, action: noop, target: '{}'}}\n",
            agent.id
        ),
    )
    .unwrap();
    let submit = || cluster.cli(&["workflow", "submit", "-f", path.to_str().unwrap()]);
    let first = submit();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(submit().status.success());
    let third = submit();
    assert!(!third.status.success());
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(stderr.contains("max_active_runs"), "{stderr}");
    let run = String::from_utf8_lossy(&first.stdout).trim().to_owned();
    let url = format!("{}/api/v1/workflows/runs/{run}", cluster.url);
    let state = wait_for("the default timeout", Duration::from_secs(20), || {
        let req = cluster.http.get(&url).bearer_auth(&cluster.admin_token);
        async move {
            let v: Value = req.send().await.ok()?.json().await.ok()?;
            let s = v["state"].as_str()?.to_owned();
            (s != "running").then_some(s)
        }
    })
    .await;
    assert_eq!(state, "timed_out");
    wait_for("room for another run", Duration::from_secs(20), || {
        let ok = submit().status.success();
        async move { ok.then_some(()) }
    })
    .await;
}
