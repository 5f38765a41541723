//! TLS (issue 13, point 6): the server serves HTTPS with its own
//! certificate; agents pin its CA or its certificate's fingerprint, keep
//! the pin and refuse anything else with a clear message; `drover up
//! --tls` makes a self-signed pair its local agent and CLI profile trust.
//! Real processes on loopback; the PKI is made with rcgen.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use drover_tests::*;
use serde_json::Value;

const CATALOG: &str = r#"
actions:
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
"#;

async fn tls_cluster(backend: Backend, pki: &TestPki) -> Cluster {
    let cluster = Cluster::start_with(
        backend,
        ServerOptions {
            tls: Some(pki.files()),
            ..ServerOptions::default()
        },
    )
    .await;
    assert!(cluster.url.starts_with("https://"), "{}", cluster.url);
    cluster
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `drover-agent enroll` with these flags; the agent's id on success.
fn enroll(agent: &mut AgentProc, flags: &[&str]) -> Result<String, String> {
    let mut args = vec!["enroll"];
    args.extend(flags);
    let out = agent.command(&args).output().expect("enroll");
    if !out.status.success() {
        return Err(stderr(&out));
    }
    agent.id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    Ok(agent.id.clone())
}

#[tokio::test]
async fn an_agent_pinning_the_ca_enrolls_heartbeats_and_runs_a_job() {
    let pki = TestPki::new();
    let ca = pki.ca_file().to_str().unwrap().to_owned();
    for backend in BACKENDS {
        let cluster = tls_cluster(backend, &pki).await;
        cluster.apply_actions(CATALOG);
        let mut agent = AgentProc::new(&cluster.url);
        let token = cluster.bootstrap_token(&[]);
        enroll(&mut agent, &["--ca-file", &ca, "--token", &token]).unwrap();
        // `run` is given no CA: the pin kept in the state dir applies.
        agent.start();
        let first = cluster.wait_online(&agent.id).await;
        cluster
            .wait_seen_after(&agent.id, first.last_seen_at.unwrap())
            .await;
        let status = agent.status();
        assert_eq!(
            status["trusts"].as_str().unwrap(),
            format!("a certificate signed by the CA in {ca}")
        );
        let out = cluster.cli_ok(&[
            "run",
            "echo",
            "--target",
            &agent.id,
            "--param",
            "message=hello over tls",
            "--follow",
        ]);
        assert!(out.contains("hello over tls"), "{out}");

        // With the pin kept, plain HTTP to the same server is refused, not
        // tried. (The agent stops first: a second one on its state dir
        // would be refused for that.)
        assert!(agent.stop().await.success());
        let plain = cluster.url.replacen("https://", "http://", 1);
        let out = agent
            .command(&["run"])
            .env("DROVER_AGENT_SERVER", &plain)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(&format!("refusing plain HTTP to {plain}")),
            "{}",
            stderr(&out)
        );
        // And the server does not answer plain HTTP on its TLS port.
        let answered = reqwest::Client::new()
            .get(format!("{plain}/readyz"))
            .send()
            .await;
        assert!(answered.is_err(), "{answered:?}");
    }
}

#[tokio::test]
async fn a_wrong_ca_fails_clearly_and_consumes_nothing() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let wrong = other.ca_file().to_str().unwrap().to_owned();
    for backend in BACKENDS {
        let cluster = tls_cluster(backend, &pki).await;
        let token = cluster.bootstrap_token(&[]);
        let mut agent = AgentProc::new(&cluster.url);
        let err = enroll(&mut agent, &["--ca-file", &wrong, "--token", &token]).unwrap_err();
        assert!(
            err.contains(
                "the server's certificate is not trusted: it is not signed by the pinned CA"
            ) && err.contains(&format!(
                "expected a certificate signed by the CA in {wrong}"
            )) && err.contains(&format!(
                "the server presented the certificate with fingerprint {}",
                pki.fingerprint
            )),
            "{err}"
        );
        assert!(!err.contains("cannot reach"), "{err}");
        assert!(!agent.state_dir().join("credentials.json").exists());
        assert!(!agent.state_dir().join("trust.json").exists());

        // Without a pin the public web roots apply, which do not know the
        // test CA: refused too, with a hint.
        let err = enroll(&mut agent, &["--token", &token]).unwrap_err();
        assert!(
            err.contains("the server's certificate is not trusted")
                && err.contains("--ca-file or --ca-fingerprint"),
            "{err}"
        );

        // The token was not used up: the right CA enrolls with it.
        let ca = pki.ca_file().to_str().unwrap();
        enroll(&mut agent, &["--ca-file", ca, "--token", &token]).unwrap();

        // A run told to trust the wrong CA (it beats the kept pin) keeps
        // failing with the same message, and never falls back.
        let log = agent.state.path().join("wrong-run.log");
        let mut child = agent
            .command(&["run", "--ca-file", &wrong])
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let text = wait_for("the refusal in the log", Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("not signed by the pinned CA").then_some(text) }
        })
        .await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(text.contains(&pki.fingerprint), "{text}");
        let agent_view = cluster.agent(&agent.id);
        assert!(agent_view.inventory.is_none(), "no heartbeat got through");
    }
}

#[tokio::test]
async fn a_pinned_fingerprint_works_and_a_wrong_one_fails() {
    let pki = TestPki::new();
    for backend in BACKENDS {
        let cluster = tls_cluster(backend, &pki).await;
        // The token's answer carries the fingerprint to pin.
        let created: Value = cluster.cli_json(&["token", "create"]);
        assert_eq!(
            created["tls_fingerprint"].as_str(),
            Some(pki.fingerprint.as_str())
        );
        let token = created["token"].as_str().unwrap().to_owned();
        let out = cluster.cli(&["token", "create"]);
        assert!(
            stderr(&out).contains(&format!("--ca-fingerprint {}", pki.fingerprint)),
            "{}",
            stderr(&out)
        );

        let wrong = format!("sha256:{}", "00".repeat(32));
        let mut agent = AgentProc::new(&cluster.url);
        let err = enroll(&mut agent, &["--ca-fingerprint", &wrong, "--token", &token]).unwrap_err();
        assert!(
            err.contains(&format!(
                "the server's certificate is not trusted: fingerprint mismatch: expected the certificate with fingerprint {wrong}, the server presented the certificate with fingerprint {}",
                pki.fingerprint
            )),
            "{err}"
        );
        // Attached to the token, also wrong.
        let err = enroll(&mut agent, &["--token", &format!("{token}#{wrong}")]).unwrap_err();
        assert!(err.contains("fingerprint mismatch"), "{err}");
        assert!(!agent.state_dir().join("credentials.json").exists());

        // The right one, attached to the token, enrolls; the pin is kept
        // and the agent heartbeats with it.
        enroll(
            &mut agent,
            &["--token", &format!("{token}#{}", pki.fingerprint)],
        )
        .unwrap();
        agent.start();
        cluster.wait_online(&agent.id).await;
        assert_eq!(
            agent.status()["trusts"].as_str().unwrap(),
            format!("the certificate with fingerprint {}", pki.fingerprint)
        );

        // A separate --ca-fingerprint enrolls a second agent.
        let mut second = AgentProc::new(&cluster.url);
        let token = cluster.bootstrap_token(&[]);
        enroll(
            &mut second,
            &["--ca-fingerprint", &pki.fingerprint, "--token", &token],
        )
        .unwrap();
        second.start();
        cluster.wait_online(&second.id).await;

        // The CLI pins a fingerprint as well (given instead of the CA).
        let out = cluster
            .cli_command(&["agents", "list", "-o", "json"])
            .env_remove("DROVER_CA_FILE")
            .env("DROVER_CA_FINGERPRINT", &wrong)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("fingerprint mismatch"),
            "{}",
            stderr(&out)
        );
        let out = cluster
            .cli_command(&["agents", "list", "-o", "json"])
            .env_remove("DROVER_CA_FILE")
            .env("DROVER_CA_FINGERPRINT", &pki.fingerprint)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn the_cli_keeps_its_pin_in_the_profile() {
    let pki = TestPki::new();
    let cluster = tls_cluster(Backend::Sqlite, &pki).await;
    let login = |extra: &[&str]| {
        let mut args = vec!["login", "--password-stdin"];
        args.extend(extra);
        let mut child = cluster
            .cli_command(&args)
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_CA_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // No pin: the test CA is unknown to the public roots.
    let out = login(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not trusted"), "{}", stderr(&out));
    let ca = pki.ca_file().to_str().unwrap();
    let out = login(&["--ca-file", ca]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Later commands need neither token nor CA: the profile has both.
    let out = cluster
        .cli_command(&["agents", "list", "-o", "json"])
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CA_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Non-loopback plain HTTP is refused unless allowed; `drover server`
/// with a key that does not match its certificate names both files.
#[tokio::test]
async fn plain_http_off_loopback_and_bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin("drover"))
            .arg("server")
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(args)
            .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("DROVER_CONFIG")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "0.0.0.0:1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("0.0.0.0:1 is not a loopback address and no TLS is configured"),
        "{}",
        stderr(&out)
    );
    let pki = TestPki::new();
    let other = TestPki::new();
    let files = pki.files();
    let out = run(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        other.files().key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot serve the certificate in"),
        "{}",
        stderr(&out)
    );
}

/// A slow client that opens a TLS connection and says nothing gives its
/// slot back after the header timeout, and others are served meanwhile.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = TestPki::new();
    let cluster = Cluster::start_with(
        Backend::Sqlite,
        ServerOptions {
            tls: Some(pki.files()),
            extra_args: vec!["--header-read-timeout".into(), "1s".into()],
            ..ServerOptions::default()
        },
    )
    .await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", cluster.port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let ready = cluster
        .http
        .get(format!("{}/readyz", cluster.url))
        .send()
        .await
        .unwrap();
    assert!(ready.status().is_success());
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
        .await
        .expect("the server closes the stalled connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

fn up(home: &Path, port: u16, log: &Path) -> Child {
    Command::new(bin("drover"))
        .args(["up", "--tls", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--heartbeat-interval", "1s"])
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env_remove("DROVER_ADMIN_PASSWORD")
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_DATA_DIR")
        .env_remove("DROVER_CA_FILE")
        .env_remove("DROVER_CA_FINGERPRINT")
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The CLI as a user in another terminal: no server, token or CA given.
fn cli(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("drover"))
        .args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CA_FILE")
        .env_remove("DROVER_CA_FINGERPRINT")
        .output()
        .unwrap()
}

async fn banner(log: &Path) -> String {
    wait_for("the drover up banner", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        async move { text.contains("Press Ctrl-C").then_some(text) }
    })
    .await
}

fn printed_fingerprint(banner: &str) -> String {
    banner
        .lines()
        .find_map(|l| l.split_once("TLS certificate fingerprint: "))
        .map(|(_, f)| f.trim().to_owned())
        .unwrap_or_else(|| panic!("no fingerprint in:\n{banner}"))
}

fn interrupt(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn up_with_tls_serves_https_end_to_end_with_the_cli() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let log1 = home.path().join("up-1.log");
    let mut first = up(home.path(), port, &log1);
    let text = banner(&log1).await;
    assert!(
        text.contains(&format!("Drover is running at https://127.0.0.1:{port}")),
        "{text}"
    );
    let fingerprint = printed_fingerprint(&text);
    assert!(
        fingerprint.starts_with("sha256:") && fingerprint.len() == 71,
        "{fingerprint}"
    );

    // The key is the owner's only.
    let data = home.path().join("data").join("drover");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The CLI profile trusts the certificate: the local agent is online.
    wait_for(
        "the local agent online over https",
        Duration::from_secs(20),
        || {
            let out = cli(home.path(), &["agents", "list", "--output", "json"]);
            async move {
                assert!(out.status.success(), "{}", stderr(&out));
                let agents: Vec<Agent> = serde_json::from_slice(&out.stdout).unwrap();
                matches!(agents.as_slice(), [a] if a.status == AgentStatus::Online).then_some(())
            }
        },
    )
    .await;
    // The token answer carries the same fingerprint, and a remote agent
    // pinning it enrolls.
    let out = cli(home.path(), &["token", "create", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        created["tls_fingerprint"].as_str(),
        Some(fingerprint.as_str())
    );
    let url = format!("https://127.0.0.1:{port}");
    let mut agent = AgentProc::new(&url);
    let token = format!("{}#{fingerprint}", created["token"].as_str().unwrap());
    enroll(&mut agent, &["--token", &token]).unwrap();

    interrupt(&mut first);
    let status = wait_exit(&mut first, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");

    // A second start reuses the pair: same fingerprint, and the profile
    // and the local agent keep working.
    let log2 = home.path().join("up-2.log");
    let mut second = up(home.path(), port, &log2);
    let text = banner(&log2).await;
    assert_eq!(printed_fingerprint(&text), fingerprint);
    wait_for(
        "the local agent online again",
        Duration::from_secs(20),
        || {
            let out = cli(home.path(), &["agents", "list", "--output", "json"]);
            async move {
                let agents: Vec<Agent> = serde_json::from_slice(&out.stdout).ok()?;
                agents
                    .iter()
                    .any(|a| a.labels.contains_key("local") && a.status == AgentStatus::Online)
                    .then_some(())
            }
        },
    )
    .await;
    interrupt(&mut second);
    let status = wait_exit(&mut second, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
}
