//! Operator experience, issue 14: audit entries that say what was done to
//! what (point 9) and one YAML error format (point 14). Real server, agent
//! and CLI; the audit on both engines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use drover_tests::*;
use serde_json::{json, Value};

const CATALOG: &str = r#"
actions:
  - name: echo
    argv: ["/bin/echo", "${message}"]
    params:
      message: {type: string}
  - name: sleep
    argv: ["/bin/sleep", "30"]
"#;

/// The newest entry whose action is `action`.
fn entry(cluster: &Cluster, action: &str) -> Value {
    let found: Vec<Value> = cluster.cli_json(&["audit", "list", "--action", action]);
    found
        .into_iter()
        .find(|e| e["action"] == action)
        .unwrap_or_else(|| panic!("no {action} entry"))
}

/// Point 9: `admin POST /api/v1/jobs /api/v1/jobs 201 ok` and logins as
/// `anonymous` become entries naming the action, its target, the details
/// and the caller.
#[tokio::test]
async fn audit_entries_say_who_did_what_to_what() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;

        // A login, right and wrong: the name tried, from where.
        cluster.cli_ok(&["users", "add", "alice", "--role", "operator"]);
        let wrong = cluster.login("not-the-password").await;
        assert!(wrong.is_err());
        let login = entry(&cluster, "user.login");
        assert_eq!(login["actor"], "admin", "{backend}: {login}");
        assert_eq!(login["target"], "user:admin", "{backend}: {login}");
        assert_eq!(login["source"], "127.0.0.1", "{backend}: {login}");
        assert_eq!(login["outcome"], "refused", "{backend}: {login}");
        assert_eq!(login["request"], "POST /api/v1/auth/login");

        // A job: its id, action and selector; its cancel: the same target.
        let id = cluster.submit("sleep", &agent.id, &[]);
        cluster.wait_running(&id).await;
        let created = entry(&cluster, "job.create");
        assert_eq!(created["target"], format!("job:{id}"), "{backend}");
        assert_eq!(created["detail"]["action"], "sleep", "{backend}");
        assert_eq!(created["detail"]["selector"], json!(agent.id), "{backend}");
        assert_eq!(created["actor"], "admin", "{backend}");
        cluster.cli_ok(&["jobs", "cancel", &id[..8]]);
        let cancel = entry(&cluster, "job.cancel");
        assert_eq!(cancel["target"], format!("job:{id}"), "{backend}: {cancel}");
        // Everything done to the job, by its target (an id prefix will do).
        let on_job: Vec<Value> =
            cluster.cli_json(&["audit", "list", "--target", &format!("job:{}", &id[..8])]);
        let actions: Vec<&str> = on_job
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["job.cancel", "job.create"], "{backend}");

        // A drain with its reason; a role change with the role.
        cluster.cli_ok(&["agents", "drain", &agent.id, "--reason", "kernel update"]);
        let drain = entry(&cluster, "agent.drain");
        assert_eq!(drain["target"], format!("agent:{}", agent.id), "{backend}");
        assert_eq!(drain["detail"]["reason"], "kernel update", "{backend}");
        cluster.cli_ok(&["users", "role", "alice", "viewer"]);
        let role = entry(&cluster, "user.role");
        assert_eq!(role["target"], "user:alice", "{backend}: {role}");
        assert_eq!(role["detail"]["role"], "viewer", "{backend}: {role}");

        // The text view reads as a sentence: who, from where, what, on what.
        let text = cluster.cli_ok(&["audit", "list", "--limit", "20"]);
        let header = text.lines().next().unwrap();
        for column in ["ACTOR", "FROM", "ACTION", "TARGET", "OUTCOME", "DETAIL"] {
            assert!(header.contains(column), "{header}");
        }
        let drain_line = text
            .lines()
            .find(|l| l.contains("agent.drain"))
            .unwrap_or_else(|| panic!("{text}"));
        for word in [
            "admin",
            "127.0.0.1",
            &format!("agent:{}", agent.id),
            "200 ok",
            "reason=kernel update",
        ] {
            assert!(drain_line.contains(word), "{word}: {drain_line}");
        }
        assert!(!text.contains("POST /api"), "{text}");

        // And the chain holds over the new fields.
        let verify = cluster.cli_ok(&["audit", "verify"]);
        assert!(verify.starts_with("OK: "), "{backend}: {verify}");
    }
}

/// Point 14: YAML errors leaked the parser's words (`set
/// DuplicateKeyPolicy in Options if acceptable`), showed `<input>` instead
/// of the file and repeated `error:`. One format everywhere: `FILE: line
/// L, column C: message`.
#[tokio::test]
async fn yaml_errors_name_file_line_and_column() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let dir = cluster.dir.path();
    let check = |stderr: &str, file: &str, line: u32, words: &str| {
        let want = format!("error: {file}: line {line}, column ");
        assert!(stderr.starts_with(&want), "want {want:?}: {stderr}");
        assert!(stderr.contains(words), "want {words:?}: {stderr}");
        assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
        for leak in ["<input>", "DuplicateKeyPolicy", "Options"] {
            assert!(!stderr.contains(leak), "{leak}: {stderr}");
        }
    };

    // An action catalog with a duplicate key.
    let catalog = dir.join("dup.yaml");
    std::fs::write(
        &catalog,
        "actions:\n  - name: a\n    name: b\n    argv: [/bin/true]\n",
    )
    .unwrap();
    let out = cluster.cli(&["actions", "apply", "-f", catalog.to_str().unwrap()]);
    assert!(!out.status.success());
    check(
        &String::from_utf8_lossy(&out.stderr),
        catalog.to_str().unwrap(),
        3,
        "duplicate mapping key `name`",
    );

    // A workflow with an unknown field: parsed by the server, named by the file.
    let flow = dir.join("flow.yaml");
    std::fs::write(
        &flow,
        "name: f\ntasks:\n  - id: a\n    action: noop\n    colour: red\n",
    )
    .unwrap();
    let out = cluster.cli(&["workflow", "submit", "-f", flow.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("flow.yaml: line 5, column 5: unknown field `colour`"),
        "{stderr}"
    );
    assert!(!stderr.contains("<input>"), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");

    // The agent's own config.
    let agent = AgentProc::with_config(&cluster.url, "capacity: 2\ncapacity: 3\n");
    let out = agent.command(&["run"]).output().expect("run drover-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent.yaml: line 2, column 1: duplicate mapping key `capacity`"),
        "{stderr}"
    );
    assert!(!stderr.contains("DuplicateKeyPolicy"), "{stderr}");
}
