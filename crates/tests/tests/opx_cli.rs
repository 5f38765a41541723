//! Issue 14, the CLI's own points: errors that name the real problem (no
//! server listening, an unknown profile, a server URL without a scheme),
//! client flags only where they mean something, help on every argument,
//! completions and man pages, `drover whoami` and `drover logout`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use drover_tests::*;

/// `drover` as a new user runs it: a HOME of its own, none of the
/// client variables set.
fn drover(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_PROFILE")
        .env_remove("DROVER_CA_FILE")
        .env_remove("DROVER_CA_FINGERPRINT")
        .stdin(Stdio::null());
    cmd
}

fn run(home: &Path, args: &[&str]) -> Output {
    drover(home, args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails unless the command failed with `want` in its stderr.
fn fails_with(out: &Output, want: &str) {
    assert!(!out.status.success(), "should fail: {}", stderr(out));
    assert!(
        stderr(out).contains(want),
        "want {want:?} in:\n{}",
        stderr(out)
    );
}

fn profiles_file(home: &Path) -> PathBuf {
    home.join("config").join("drover").join("cli.toml")
}

#[test]
fn nothing_listening_is_said_so_not_a_missing_login() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let refused = format!(
        "cannot reach the server at {url}: connection refused (is `drover server` running?)"
    );
    // No token anywhere: the unreachable server is what is reported.
    fails_with(
        &run(home.path(), &["--server", &url, "agents", "list"]),
        &refused,
    );
    let out = run(home.path(), &["--server", &url, "agents", "list"]);
    assert!(!stderr(&out).contains("not logged in"), "{}", stderr(&out));
    // With a token too, and with the flag after the subcommand.
    fails_with(
        &run(
            home.path(),
            &["agents", "list", "--server", &url, "--token", "drv_x"],
        ),
        &refused,
    );
    // HOST:PORT means http://HOST:PORT.
    let bare = format!("127.0.0.1:{port}");
    fails_with(
        &run(home.path(), &["--server", &bare, "jobs", "list"]),
        &refused,
    );
    let out = drover(home.path(), &["whoami"])
        .env("DROVER_SERVER", &bare)
        .output()
        .unwrap();
    fails_with(&out, &refused);
}

#[test]
fn a_server_that_is_not_a_url_is_named() {
    let home = tempfile::tempdir().unwrap();
    for bad in [
        "not a url",
        "ftp://127.0.0.1:7070",
        "http://",
        "127.0.0.1:port",
    ] {
        let out = run(home.path(), &["--server", bad, "agents", "list"]);
        fails_with(&out, &format!("'{bad}' is not a server URL"));
        assert!(!stderr(&out).contains("builder error"), "{}", stderr(&out));
    }
}

#[test]
fn an_unknown_profile_names_the_ones_that_exist() {
    let home = tempfile::tempdir().unwrap();
    let path = profiles_file(home.path());
    // No profile file at all.
    let none = format!("no profile named 'nosuch' in {}", path.display());
    fails_with(
        &run(home.path(), &["--profile", "nosuch", "agents", "list"]),
        &none,
    );
    // `default` with no file is simply empty: the next problem is reported.
    let url = format!("http://127.0.0.1:{}", free_port());
    fails_with(
        &run(
            home.path(),
            &["--profile", "default", "--server", &url, "agents", "list"],
        ),
        "cannot reach the server",
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        format!(
            "[profiles.a]\nserver = \"{url}\"\n\n[profiles.b]\nserver = \"{url}\"\ntoken = \"drv_x\"\n"
        ),
    )
    .unwrap();
    let listed = format!(
        "no profile named 'nosuch' in {} (profiles: a, b)",
        path.display()
    );
    fails_with(
        &run(home.path(), &["--profile", "nosuch", "agents", "list"]),
        &listed,
    );
    fails_with(
        &run(home.path(), &["agents", "list", "--profile", "nosuch"]),
        &listed,
    );
    let out = drover(home.path(), &["fleet", "status"])
        .env("DROVER_PROFILE", "nosuch")
        .output()
        .unwrap();
    fails_with(&out, &listed);
    // An explicit `default` that is not saved while others are.
    fails_with(
        &run(home.path(), &["--profile", "default", "agents", "list"]),
        "no profile named 'default'",
    );
    // A profile that exists is used: its server is the one out of reach.
    fails_with(
        &run(home.path(), &["--profile", "b", "agents", "list"]),
        &format!("cannot reach the server at {url}: connection refused"),
    );
}

#[test]
fn server_and_up_take_no_client_flags() {
    let home = tempfile::tempdir().unwrap();
    for sub in ["server", "up"] {
        let help = stdout(&run(home.path(), &[sub, "--help"]));
        assert!(help.contains("--data-dir"), "{help}");
        for flag in [
            "--server <",
            "--token <",
            "--ca-file <",
            "--ca-fingerprint <",
        ] {
            assert!(
                !help.contains(flag),
                "drover {sub} --help lists {flag}:\n{help}"
            );
        }
        // After the subcommand: refused by name, not ignored.
        fails_with(
            &run(home.path(), &[sub, "--token", "x"]),
            &format!("--token is a client flag: drover {sub} does not use it"),
        );
        // Before it: refused by name instead of ignored.
        fails_with(
            &run(home.path(), &["--server", "http://127.0.0.1:1", sub]),
            &format!("--server is a client flag: drover {sub} does not use it"),
        );
    }
    // `up` saves a profile, so it takes --profile; `server` does not.
    let help = stdout(&run(home.path(), &["up", "--help"]));
    assert!(help.contains("--profile <NAME>"), "{help}");
    for args in [&["--profile", "x", "server"], &["server", "--profile", "x"]] {
        fails_with(
            &run(home.path(), args),
            "--profile is a client flag: drover server does not use it",
        );
    }
    // The client commands list them, with their variables.
    let help = stdout(&run(home.path(), &["agents", "list", "--help"]));
    for want in [
        "--server <URL>",
        "DROVER_SERVER",
        "--token <TOKEN>",
        "--profile <NAME>",
    ] {
        assert!(help.contains(want), "{want}:\n{help}");
    }
}

#[test]
fn the_arguments_the_issue_named_have_descriptions() {
    // The unit test in crates/cli walks the whole tree; these are the ones
    // a user found bare, as `--help` shows them.
    let home = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["jobs", "logs", "--help"],
            &[
                "<ID>  Job id or a unique prefix of it",
                "--follow  Keep printing new output",
            ],
        ),
        (
            &["agents", "revoke", "--help"],
            &["Why: recorded with the agent"],
        ),
        (
            &["actions", "apply", "--help"],
            &["The catalog file (YAML)"],
        ),
        (
            &["audit", "list", "--help"],
            &[
                "Only entries of this user",
                "At most this many entries",
            ],
        ),
        (&["webhooks", "add", "--help"], &["The URL to POST to"]),
        (
            &["agents", "list", "--help"],
            &["Output format: text for people, json for scripts"],
        ),
    ];
    for (args, wants) in cases {
        let help = stdout(&run(home.path(), args))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for want in *wants {
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(help.contains(&want), "{args:?}: {want:?} in\n{help}");
        }
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(home.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for sub in ["agents", "workflow", "whoami", "logout"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    // The bash script is valid bash.
    let script = home.path().join("drover.bash");
    std::fs::write(&script, run(home.path(), &["completions", "bash"]).stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "bash -n: {}", stderr(&check));
    fails_with(
        &run(home.path(), &["completions", "tcsh"]),
        "invalid value 'tcsh'",
    );
}

#[test]
fn man_pages_for_drover_and_each_subcommand() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("man1");
    let out = run(home.path(), &["man", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "drover.1",
        "drover-agents.1",
        "drover-agents-list.1",
        "drover-whoami.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH "), "{page}: {text}");
        assert!(stdout(&out).contains(page), "{page} not listed");
    }
    // groff formats one (the test environment has it).
    let formatted = Command::new("groff")
        .args(["-man", "-Tutf8"])
        .arg(dir.join("drover-agents-list.1"))
        .output()
        .expect("groff");
    assert!(formatted.status.success(), "{}", stderr(&formatted));
    let text = stdout(&formatted);
    assert!(text.contains("drover-agents-list"), "{text}");
}

/// `drover login` with the admin's password on stdin, into `profile`.
fn login(cluster: &Cluster, home: &Path, profile: &str) -> Output {
    let mut child = drover(home, &["login", "--profile", profile, "--password-stdin"])
        .env("DROVER_SERVER", &cluster.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{ADMIN_PASSWORD}").unwrap();
    child.wait_with_output().unwrap()
}

async fn whoami_status(cluster: &Cluster, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}/api/v1/auth/whoami", cluster.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn whoami_login_logout_and_a_missing_token() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let home = tempfile::tempdir().unwrap();
        let home = home.path();

        // The harness's admin session, from DROVER_TOKEN.
        let text = cluster.cli_ok(&["whoami"]);
        for want in [
            &format!("server:      {}", cluster.url)[..],
            "profile:     default",
            "user:        admin",
            "role:        admin",
            "scope:       everywhere its role allows",
            "token:       session ",
            "expires:     20",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        let me: serde_json::Value = cluster.cli_json(&["whoami"]);
        assert_eq!(me["username"], "admin");
        assert_eq!(me["role"], "admin");
        assert_eq!(me["token"]["kind"], "session");
        assert_eq!(me["server"], cluster.url.as_str());

        // A server that answers, no token: now it is the login that is missing.
        let out = drover(home, &["agents", "list"])
            .env("DROVER_SERVER", &cluster.url)
            .output()
            .unwrap();
        fails_with(
            &out,
            &format!("not logged in to {}: run drover login", cluster.url),
        );

        // Log in to a new profile: whoami needs no token then.
        let out = login(&cluster, home, "ops");
        assert!(out.status.success(), "{}", stderr(&out));
        let out = drover(home, &["--profile", "ops", "whoami"])
            .env("DROVER_SERVER", &cluster.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("profile:     ops"),
            "{}",
            stdout(&out)
        );
        assert!(
            stdout(&out).contains("user:        admin"),
            "{}",
            stdout(&out)
        );
        // The only profile in this home: its one token line.
        let saved = std::fs::read_to_string(profiles_file(home)).unwrap();
        let token = saved
            .lines()
            .find_map(|l| l.strip_prefix("token = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no token in {saved}"))
            .to_owned();
        assert_eq!(whoami_status(&cluster, &token).await, 200);

        // Log out: the server revokes the session, the profile forgets it.
        let out = run(home, &["logout", "--profile", "ops"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "logged out of {} (profile 'ops'): session token",
                cluster.url
            )),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
        assert_eq!(whoami_status(&cluster, &token).await, 401);
        let saved = std::fs::read_to_string(profiles_file(home)).unwrap();
        assert!(!saved.contains(&token), "{saved}");
        assert!(saved.contains(&cluster.url), "the server stays: {saved}");
        fails_with(
            &run(home, &["--profile", "ops", "whoami"]),
            &format!("not logged in to {}", cluster.url),
        );
        // Again: nothing to end, and said so.
        let out = run(home, &["logout", "--profile", "ops"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not logged in: profile 'ops' holds no token"),
            "{}",
            stderr(&out)
        );
        fails_with(
            &run(home, &["logout", "--profile", "nosuch"]),
            "no profile named 'nosuch'",
        );
        // The logout is in the audit log.
        let audit = cluster.cli_ok(&["audit", "list", "--action", "logout"]);
        assert!(audit.contains("logout"), "{audit}");

        // A server given as HOST:PORT is the same server.
        let bare = cluster.url.trim_start_matches("http://");
        let out = cluster.cli(&["--server", bare, "whoami"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains(&format!("server:      {}", cluster.url)));
    }
}
