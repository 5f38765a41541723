//! The scripts library (issue 16, point 1) through the real CLI and
//! server, on both engines: versions named by their SHA-256, the same
//! content naming the version there is, `show NAME[@VERSION]`, `diff`,
//! clear refusals of bad input that change nothing, admins only, and
//! every upload in the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use drover_tests::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn scripts_are_immutable_versions_named_by_their_hash() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("motd.sh");
        let file_s = file.to_str().unwrap();
        let v1 = "#!/bin/sh\necho 'hello'\necho one\n";
        let v2 = "#!/bin/sh\necho 'hello'\necho two\n";

        std::fs::write(&file, v1).unwrap();
        let added: Value = cluster.cli_json(&["scripts", "add", "motd", "-f", file_s]);
        assert_eq!(added["created"], true, "{backend}: {added}");
        assert_eq!(added["version"]["sha256"], sha(v1));
        assert_eq!(added["version"]["interpreter"], "/bin/sh");
        assert_eq!(added["version"]["created_by"], "admin");
        // The same content again: unchanged, the same version.
        let again = cluster.cli_ok(&["scripts", "add", "motd", "-f", file_s]);
        assert!(again.contains("unchanged"), "{again}");
        assert!(again.contains(&sha(v1)), "{again}");
        // The same content with another interpreter: refused.
        let out = cluster.cli(&[
            "scripts",
            "add",
            "motd",
            "-f",
            file_s,
            "--interpreter",
            "/bin/bash",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("interpreter cannot change"),
            "{}",
            stderr(&out)
        );

        std::fs::write(&file, v2).unwrap();
        let text = cluster.cli_ok(&["scripts", "add", "motd", "-f", file_s]);
        assert!(text.contains(&format!("added motd@{}", sha(v2))), "{text}");

        let list: Vec<Value> = cluster.cli_json(&["scripts", "list"]);
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["versions"], 2);
        assert_eq!(list[0]["latest"]["sha256"], sha(v2));
        let versions: Vec<Value> = cluster.cli_json(&["scripts", "show", "motd"]);
        let hashes: Vec<&str> = versions
            .iter()
            .map(|v| v["sha256"].as_str().unwrap())
            .collect();
        assert_eq!(hashes, [sha(v2), sha(v1)], "newest first");

        // A version by a prefix of its hash, and the latest.
        let old = cluster.cli_ok(&["scripts", "show", &format!("motd@{}", &sha(v1)[..10])]);
        assert_eq!(old, v1);
        let latest = cluster.cli_ok(&["scripts", "show", "motd@latest"]);
        assert_eq!(latest, v2);

        let diff = cluster.cli_ok(&["scripts", "diff", "motd"]);
        assert!(
            diff.contains(&format!("--- motd@{}", &sha(v1)[..12])),
            "{diff}"
        );
        assert!(
            diff.contains(&format!("+++ motd@{}", &sha(v2)[..12])),
            "{diff}"
        );
        assert!(
            diff.contains("-echo one\n") && diff.contains("+echo two\n"),
            "{diff}"
        );
        assert!(diff.contains(" echo 'hello'\n"), "{diff}");

        // Bad input: a clear error naming what is wrong, nothing changed.
        let refusals: [(&[&str], &str); 4] = [
            (
                &["scripts", "add", "a;rm -rf /", "-f", file_s],
                "script name",
            ),
            (
                &[
                    "scripts",
                    "add",
                    "ok",
                    "-f",
                    file_s,
                    "--interpreter",
                    "sh -c",
                ],
                "interpreter",
            ),
            (&["scripts", "show", "motd@zzzz"], "version 'zzzz'"),
            (&["scripts", "show", "motd@0000"], "not found"),
        ];
        for (args, want) in refusals {
            let out = cluster.cli(args);
            assert!(!out.status.success(), "{args:?}");
            assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        }
        let big = dir.path().join("big.sh");
        std::fs::write(&big, "#".repeat(256 * 1024 + 1)).unwrap();
        let out = cluster.cli(&["scripts", "add", "big", "-f", big.to_str().unwrap()]);
        assert!(stderr(&out).contains("at most 262144"), "{}", stderr(&out));
        let binary = dir.path().join("bin.sh");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let out = cluster.cli(&["scripts", "add", "bin", "-f", binary.to_str().unwrap()]);
        assert!(stderr(&out).contains("not UTF-8"), "{}", stderr(&out));
        // The API refuses what the CLI would not send.
        for (body, want) in [
            (json!({"name": "x", "content": "a\u{0}b"}), "NUL"),
            (json!({"name": "x", "content": ""}), "empty"),
            (json!({"name": "x", "content": "echo", "extra": 1}), "extra"),
            (
                json!({"name": "x", "content": "#".repeat(256 * 1024 + 1)}),
                "at most",
            ),
        ] {
            let (status, answer) = post_json(
                &cluster.http,
                format!("{}/api/v1/scripts", cluster.url),
                Some(&cluster.admin_token),
                body,
            )
            .await;
            assert_eq!(status, 422, "{answer}");
            assert!(answer.to_string().contains(want), "{want}: {answer}");
        }
        let list: Vec<Value> = cluster.cli_json(&["scripts", "list"]);
        assert_eq!(list.len(), 1, "nothing was added: {list:?}");

        // Only admins add; viewers read.
        let password = cluster.add_user("vera", "viewer", &[]);
        let (status, login) = post_json(
            &cluster.http,
            format!("{}/api/v1/auth/login", cluster.url),
            None,
            json!({"username": "vera", "password": password}),
        )
        .await;
        assert_eq!(status, 200, "{login}");
        let vera = login["token"].as_str().unwrap();
        let (status, answer) = post_json(
            &cluster.http,
            format!("{}/api/v1/scripts", cluster.url),
            Some(vera),
            json!({"name": "sneaky", "content": "echo hi"}),
        )
        .await;
        assert_eq!(status, 403, "{answer}");
        let listed = cluster
            .http
            .get(format!(
                "{}/api/v1/scripts/motd/versions/latest",
                cluster.url
            ))
            .bearer_auth(vera)
            .send()
            .await
            .unwrap();
        assert_eq!(listed.status(), 200);

        // Each upload is audited with its version; the refused ones too.
        let audit: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", "script.add"]);
        let added: Vec<&Value> = audit.iter().filter(|e| e["status"] == 201).collect();
        assert_eq!(added.len(), 2, "{audit:#?}");
        for e in &added {
            assert_eq!(e["actor"], "admin", "{e}");
        }
        let targets: Vec<&str> = added
            .iter()
            .map(|e| e["target"].as_str().unwrap())
            .collect();
        assert!(
            targets.contains(&format!("script:motd@{}", sha(v1)).as_str()),
            "{targets:?}"
        );
        assert!(
            targets.contains(&format!("script:motd@{}", sha(v2)).as_str()),
            "{targets:?}"
        );
        assert!(
            audit
                .iter()
                .any(|e| e["status"] == 403 && e["actor"] == "vera"),
            "{audit:#?}"
        );
    }
}
