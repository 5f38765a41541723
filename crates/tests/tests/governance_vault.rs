//! The secrets vault (issue 13, point 3): a secret reaches the process
//! environment and nothing else — not the database file, the server's log,
//! any API answer or the CLI's output; its scope keeps it from other
//! agents and actions; the master key can be rotated; a wrong master key
//! stops the server at start. Real processes on loopback, both engines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drover_tests::*;
use serde_json::Value;

fn random_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(&format!("{:016x}", rand_u64()));
    }
    s.truncate(n);
    s
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn catalog(out_file: &Path) -> String {
    format!(
        r#"
actions:
  - name: show-secret
    argv: ["/bin/sh", "-c", "printf 'token=%s\n' \"$TOKEN\"; printf '%s' \"$TOKEN\" > \"$OUT_FILE\"; echo \"::set-output name=tok::$TOKEN\"; echo \"$HEADER\" >&2"]
    env:
      TOKEN: "${{{{ secrets.TOKEN }}}}"
      HEADER: "Bearer ${{{{ secrets.TOKEN }}}}"
      OUT_FILE: "{}"
    timeout: 10s
  - name: other-action
    argv: ["/bin/sh", "-c", "echo \"$TOKEN\""]
    env:
      TOKEN: "${{{{ secrets.TOKEN }}}}"
"#,
        out_file.display()
    )
}

/// `drover secrets set NAME --stdin` with the value piped in.
fn set_secret(cluster: &Cluster, name: &str, value: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["secrets", "set", name, "--stdin"];
    args.extend(extra);
    let mut child = cluster
        .cli_command(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover secrets set");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn api_get(cluster: &Cluster, path: &str) -> String {
    let resp = cluster
        .http
        .get(format!("{}/api/v1{path}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp.text().await.unwrap()
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The files of a SQLite database: the file, its WAL and shared memory.
fn sqlite_files(db: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| PathBuf::from(format!("{}{s}", db.display())))
        .filter(|p| p.exists())
        .collect()
}

fn server_logs(cluster: &Cluster) -> String {
    let mut all = String::new();
    for n in 1..=10 {
        if let Ok(t) = std::fs::read_to_string(cluster.server_log(n)) {
            all.push_str(&t);
        }
    }
    all
}

#[tokio::test]
async fn secrets_reach_the_process_only_and_are_masked_everywhere_else() {
    for backend in BACKENDS {
        let dbdir = tempfile::tempdir().unwrap();
        let db = dbdir.path().join("vault.db");
        let options = ServerOptions {
            database_url: (backend == Backend::Sqlite)
                .then(|| format!("sqlite://{}", db.display())),
            ..ServerOptions::default()
        };
        let mut cluster = Cluster::start_with(backend, options).await;
        let value = format!("s3cr3t-{}", random_hex(24));
        let out_file = cluster.dir.path().join("received.txt");
        cluster.apply_actions(&catalog(&out_file));

        // A secret in argv is refused when the catalog is applied, naming
        // the element.
        let bad = cluster.dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "actions:\n  - name: leak\n    argv: [\"/bin/echo\", \"${{ secrets.TOKEN }}\"]\n",
        )
        .unwrap();
        let out = cluster.cli(&["actions", "apply", "-f", bad.to_str().unwrap()]);
        assert!(!out.status.success(), "{backend}");
        assert!(
            text(&out).contains("argv[1]") && text(&out).contains("secret"),
            "{backend}: {}",
            text(&out)
        );

        let web = cluster.enroll_agent(&["--label", "role=web"]).await;
        let mut db_agent = cluster.enroll_agent(&["--label", "role=db"]).await;
        cluster.wait_online(&web.id).await;
        cluster.wait_online(&db_agent.id).await;

        // Set through stdin; the CLI does not print it.
        let out = set_secret(
            &cluster,
            "TOKEN",
            &value,
            &["--actions", "show-*", "--target", "role=web"],
        );
        assert!(out.status.success(), "{backend}: {}", text(&out));
        let mut cli_output = text(&out);

        // Bad input is refused, naming what is wrong, and changes nothing.
        let out = set_secret(&cluster, "BAD-NAME", "x", &[]);
        assert!(!out.status.success());
        assert!(text(&out).contains("BAD-NAME"), "{}", text(&out));
        let out = set_secret(&cluster, "OTHER", "x", &["--target", ""]);
        assert!(!out.status.success());
        assert!(text(&out).contains("target"), "{}", text(&out));

        // It reaches the process; stored output, outputs and stderr are masked.
        let out = cluster.cli(&["run", "show-secret", "--target", &web.id, "--follow"]);
        cli_output.push_str(&text(&out));
        assert!(out.status.success(), "{backend}: {}", text(&out));
        assert_eq!(
            std::fs::read_to_string(&out_file).unwrap(),
            value,
            "{backend}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(stdout.contains("token=***"), "{backend}: {stdout}");
        let jobs: Value = cluster.cli_json(&["jobs", "list"]);
        let job_id = jobs[0]["id"].as_str().unwrap().to_owned();
        let logs = text(&cluster.cli(&["jobs", "logs", &job_id]));
        assert!(logs.contains("token=***"), "{backend}: {logs}");
        assert!(logs.contains("Bearer ***"), "{backend}: {logs}");
        cli_output.push_str(&logs);
        let shown = cluster.cli_ok(&["jobs", "show", &job_id, "--output", "json"]);
        cli_output.push_str(&shown);

        // Another action, or an agent outside the target: refused when the
        // job is created, naming the secret.
        for (action, target) in [
            ("other-action", web.id.as_str()),
            ("show-secret", db_agent.id.as_str()),
        ] {
            let out = cluster.cli(&["run", action, "--target", target]);
            assert!(!out.status.success(), "{backend} {action}");
            assert!(
                text(&out).contains("secret 'TOKEN'"),
                "{backend}: {}",
                text(&out)
            );
            cli_output.push_str(&text(&out));
        }

        // Re-checked at dispatch: a job created while the scope allowed
        // it, for an agent that was drained, is refused once the scope
        // narrowed, and that agent never receives the value.
        let out = set_secret(&cluster, "TOKEN", &value, &["--actions", "show-*"]);
        assert!(out.status.success(), "{}", text(&out));
        cluster.cli_ok(&["agents", "drain", &db_agent.id]);
        let queued = cluster.submit("show-secret", &db_agent.id, &[]);
        let out = set_secret(
            &cluster,
            "TOKEN",
            &value,
            &["--actions", "show-*", "--target", "role=web"],
        );
        assert!(out.status.success(), "{}", text(&out));
        cluster.cli_ok(&["agents", "resume", &db_agent.id]);
        let job = cluster.wait_job(&queued, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Rejected, "{backend}: {job:?}");
        let reason = serde_json::to_string(&job).unwrap();
        assert!(reason.contains("secret 'TOKEN'"), "{backend}: {reason}");
        assert!(!reason.contains(&value));
        db_agent.stop().await;
        assert!(!db_agent.log().contains(&value), "{backend}");

        // No API answer carries it.
        let secrets = api_get(&cluster, "/secrets").await;
        assert!(
            secrets.contains("\"TOKEN\"") && secrets.contains("role=web"),
            "{secrets}"
        );
        for path in [
            "/secrets".to_owned(),
            "/jobs".to_owned(),
            format!("/jobs/{job_id}"),
            format!("/jobs/{job_id}/logs"),
            format!("/jobs/{queued}"),
            "/audit".to_owned(),
            "/workflows/runs".to_owned(),
            "/webhooks".to_owned(),
        ] {
            let body = api_get(&cluster, &path).await;
            assert!(
                !body.contains(&value),
                "{backend}: GET {path} shows the value"
            );
        }
        let audit = api_get(&cluster, "/audit").await;
        assert!(audit.contains("\"secret:TOKEN\""), "{backend}: {audit}");
        assert!(
            !cli_output.contains(&value),
            "{backend}: the CLI printed it"
        );

        // Rotation: a new master key first, the old one after it; rotate;
        // then the old key alone is gone and the secrets still open.
        let key_file = cluster.data_dir().join("master.key");
        let old_key = std::fs::read_to_string(&key_file).unwrap();
        let new_key = random_hex(64);
        cluster.stop_server().await;
        std::fs::write(&key_file, format!("{new_key}\n{old_key}")).unwrap();
        cluster.start_server().await;
        let rotated: Value = cluster.cli_json(&["secrets", "rotate-master-key"]);
        assert_eq!(rotated["rewrapped"], 1, "{backend}: {rotated}");
        let new_id = rotated["master_key_id"].as_str().unwrap().to_owned();
        cluster.stop_server().await;
        {
            let store = drover_store::Store::open(&drover_store::Options {
                url: cluster.database_url().to_owned(),
                max_connections: 1,
            })
            .await
            .unwrap();
            let keys = store.vault_keys().await.unwrap();
            assert_eq!(keys.len(), 1, "{backend}");
            assert!(
                keys.iter().all(|k| k.master_key_id == new_id),
                "{backend}: {keys:?}"
            );
            store.close().await;
        }
        std::fs::write(&key_file, format!("{new_key}\n")).unwrap();
        cluster.start_server().await;
        std::fs::remove_file(&out_file).unwrap();
        let again = cluster.submit("show-secret", &web.id, &[]);
        let job = cluster.wait_job(&again, Duration::from_secs(20)).await;
        assert_eq!(job.state, JobState::Succeeded, "{backend}: {job:?}");
        assert_eq!(
            std::fs::read_to_string(&out_file).unwrap(),
            value,
            "{backend}"
        );

        // A webhook secret is stored sealed too.
        let hook_secret = format!("hook-{}", random_hex(24));
        let (code, _) = post_json(
            &cluster.http,
            format!("{}/api/v1/webhooks", cluster.url),
            Some(&cluster.admin_token),
            serde_json::json!({"url": "https://example.com/hook", "secret": hook_secret}),
        )
        .await;
        assert_eq!(code, 201, "{backend}");

        // A wrong master key stops the server at start, saying why.
        cluster.stop_server().await;
        std::fs::write(&key_file, format!("{}\n", random_hex(64))).unwrap();
        let out = std::process::Command::new(bin("drover"))
            .arg("server")
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(cluster.data_dir())
            .args(["--database-url", cluster.database_url()])
            .env("DROVER_ADMIN_PASSWORD", "unused-password")
            .env_remove("DROVER_CONFIG")
            .current_dir(cluster.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{backend}");
        let err = text(&out);
        assert!(
            err.contains("wrapped by master key") && err.contains(&new_id),
            "{backend}: {err}"
        );
        assert!(!err.contains(&value));

        // Nowhere in the database's bytes, nor the server's log.
        if backend == Backend::Sqlite {
            let files = sqlite_files(&db);
            assert!(!files.is_empty());
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                assert!(
                    !contains_bytes(&bytes, value.as_bytes()),
                    "{} holds the secret",
                    f.display()
                );
                assert!(
                    !contains_bytes(&bytes, hook_secret.as_bytes()),
                    "{} holds the webhook secret",
                    f.display()
                );
                assert!(
                    !contains_bytes(&bytes, new_key.as_bytes()),
                    "{} holds the master key",
                    f.display()
                );
            }
        }
        let logs = server_logs(&cluster);
        assert!(!logs.is_empty());
        assert!(
            !logs.contains(&value),
            "{backend}: the server log shows the secret"
        );
        assert!(logs.contains("secret set"), "{backend}");
    }
}
