//! `drover up`: a server on SQLite plus one local agent, a CLI profile that
//! needs no login, a clean Ctrl-C, and a second start on the same data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_tests::*;

fn up(home: &Path, port: u16, log: &Path) -> Child {
    Command::new(bin("drover"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--heartbeat-interval", "1s"])
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env_remove("DROVER_ADMIN_PASSWORD")
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_DATA_DIR")
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The CLI as a user in another terminal: no server, no token given.
fn agents_list(home: &Path) -> Vec<Agent> {
    let out = Command::new(bin("drover"))
        .args(["agents", "list", "--output", "json"])
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_banner(log: &Path) -> String {
    wait_for("the drover up banner", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        async move { text.contains("Press Ctrl-C").then_some(text) }
    })
    .await
}

fn interrupt(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn up_runs_server_and_local_agent_and_reuses_its_data() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let log1 = home.path().join("up-1.log");
    let mut first = up(home.path(), port, &log1);
    let banner = wait_banner(&log1).await;
    assert!(
        banner.contains(&format!("Drover is running at http://127.0.0.1:{port}")),
        "{banner}"
    );
    let password = banner
        .lines()
        .find_map(|l| {
            l.split_once("with password: ")
                .map(|(_, p)| p.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no generated password in:\n{banner}"));

    let agent = wait_for("the local agent online", Duration::from_secs(20), || {
        let agents = agents_list(home.path());
        async move {
            match agents.as_slice() {
                [a] if a.status == AgentStatus::Online => Some(a.clone()),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(agent.labels.get("local").map(String::as_str), Some("true"));

    // The printed password logs in.
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    interrupt(&first);
    let status = wait_exit(&mut first, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log1).unwrap();
    assert_eq!(
        text.matches(&password).count(),
        1,
        "the password is printed once only"
    );
    assert!(text.contains("server stopped"), "{text}");

    let log2 = home.path().join("up-2.log");
    let mut second = up(home.path(), port, &log2);
    let banner = wait_banner(&log2).await;
    assert!(
        !banner.contains(&password),
        "password shown again:\n{banner}"
    );
    assert!(banner.contains(&agent.id), "{banner}");
    let mark = chrono::Utc::now();
    let again = wait_for("the same agent seen again", Duration::from_secs(20), || {
        let agents = agents_list(home.path());
        async move {
            match agents.as_slice() {
                [a] if a.last_seen_at.is_some_and(|t| t > mark) => Some(a.clone()),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(again.id, agent.id);
    interrupt(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(15))
        .await
        .success());
}
