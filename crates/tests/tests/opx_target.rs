//! Operator experience (issue 14), targeting and object lifecycles: the
//! selector grammar as `agents list --target` shows it and `run` uses it
//! (point 13), reserved label names, `set-group`, revoked agents' dispatch,
//! webhook id prefixes and typed parameters (point 11), and showing and
//! removing actions, sandboxes and revoked agents (point 12). Through the
//! real CLI, on both engines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use drover_proto::api::Agent;
use drover_proto::jobs::{Action, JobState};
use drover_tests::*;

const CATALOG: &str = r#"
sandboxes:
  - name: tight
    type: process
    cpu_time: 30s
    open_files: 64
actions:
  - name: echo
    description: Print a message
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    timeout: 10s
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    timeout: 60s
  - name: limited-echo
    argv: ["/bin/echo", "limited"]
    sandbox: tight
"#;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The ids `agents list --target SEL` prints (as JSON).
fn selected(cluster: &Cluster, sel: &str) -> BTreeSet<String> {
    let agents: Vec<Agent> = cluster.cli_json(&["agents", "list", "--target", sel]);
    agents.into_iter().map(|a| a.id).collect()
}

/// The agents a job reached: one attempt per agent.
async fn reached(cluster: &Cluster, sel: &str) -> BTreeSet<String> {
    let id = cluster.submit("echo", sel, &["--param", "message=hi"]);
    let job = cluster.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Succeeded, "{sel}: {job:?}");
    job.attempts.into_iter().map(|a| a.agent_id).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// `agents list --target` shows exactly what a selector selects, and a job
/// with the same target reaches exactly those agents: lists, negation,
/// groups combined with labels, globs and inventory facts.
#[tokio::test]
async fn agents_list_target_shows_what_run_reaches() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let web = cluster
            .enroll_agent(&[
                "--label", "role=web", "--label", "env=prod", "--group", "local",
            ])
            .await;
        let api = cluster
            .enroll_agent(&["--label", "role=api", "--label", "env=dev"])
            .await;
        let db = cluster
            .enroll_agent(&["--label", "role=db", "--group", "local"])
            .await;
        for a in [&web, &api, &db] {
            cluster.wait_online(&a.id).await;
        }
        let (w, a, d) = (web.id.as_str(), api.id.as_str(), db.id.as_str());
        let arch = cluster.agent(w).inventory.unwrap().arch;

        let cases: &[(&str, &[&str])] = &[
            ("role in (web,api),!env=prod", &[a]),
            ("role in (web, api), env != prod", &[a]),
            ("role notin (web,api)", &[d]),
            ("!role in (db)", &[w, a]),
            ("group:local", &[w, d]),
            ("group:local,role=web", &[w]),
            ("!group:local", &[a]),
            ("env", &[w, a]),
            ("!env", &[d]),
            ("role=*b", &[w, d]),
            ("env!=prod", &[a, d]),
            ("*", &[w, a, d]),
            (&format!("arch={arch},hostname=*"), &[w, a, d]),
            (&format!("role=db,arch in ({arch},nosuch)"), &[d]),
        ];
        for (sel, want) in cases {
            assert_eq!(selected(&cluster, sel), set(want), "{backend}: {sel}");
            // What the listing shows is what a job reaches.
            assert_eq!(reached(&cluster, sel).await, set(want), "{backend}: {sel}");
        }

        // Nothing selected: an empty list, said on stderr; a job is refused.
        assert!(selected(&cluster, &format!("arch!={arch}")).is_empty());
        let out = cluster.cli(&["agents", "list", "--target", "role=nosuch"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("target 'role=nosuch' matches no agent"));
        let out = cluster.cli(&[
            "run",
            "echo",
            "--target",
            "role=nosuch",
            "--param",
            "message=x",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("matches no agent"),
            "{}",
            stderr(&out)
        );

        // The text view says how many it selects.
        let out = cluster.cli(&["agents", "list", "--target", "group:local"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(w) && text.contains(d) && !text.contains(a),
            "{text}"
        );
        assert!(
            stderr(&out).contains("matches 2 agent(s)"),
            "{}",
            stderr(&out)
        );

        // An agent id, as before.
        assert_eq!(selected(&cluster, &w[..23]), set(&[w]));

        // A selector that does not parse names the column and what was
        // expected, for the listing and for a job alike.
        for args in [
            vec!["agents", "list", "--target", "role in (web"],
            vec![
                "run",
                "echo",
                "--target",
                "role in (web",
                "--param",
                "message=x",
            ],
        ] {
            let out = cluster.cli(&args);
            assert!(!out.status.success(), "{args:?}");
            assert!(
                stderr(&out).contains(
                    "column 13: expected ',' or ')' in the list of values, found the end"
                ),
                "{args:?}: {}",
                stderr(&out)
            );
        }
        let out = cluster.cli(&["agents", "list", "--target", "!env!=prod"]);
        assert!(
            stderr(&out).contains("column 1: '!' cannot negate '!='"),
            "{}",
            stderr(&out)
        );

        // Workflow targets use the same grammar, and are checked at submission.
        let sel = "role in (api, web), !env=prod";
        let path = cluster.dir.path().join("targeted.yaml");
        std::fs::write(
            &path,
            format!("name: targeted\ntasks:\n  - id: a\n    action: echo\n    params: {{message: hi}}\n    target: \"{sel}\"\n"),
        )
        .unwrap();
        cluster.cli_ok(&["workflow", "submit", "-f", path.to_str().unwrap()]);
        let job = wait_for("the task's job", Duration::from_secs(30), || {
            let jobs: Vec<drover_proto::jobs::Job> = cluster.cli_json(&["jobs", "list"]);
            async move { jobs.into_iter().find(|j| j.target == sel) }
        })
        .await;
        let job = cluster.wait_job(&job.id, Duration::from_secs(30)).await;
        let agents: BTreeSet<String> = job.attempts.into_iter().map(|a| a.agent_id).collect();
        assert_eq!(agents, set(&[a]), "{backend}");
        std::fs::write(
            &path,
            "name: mistargeted\ntasks:\n  - {id: a, action: echo, params: {message: hi}, target: 'role in web'}\n",
        )
        .unwrap();
        let out = cluster.cli(&["workflow", "submit", "-f", path.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("target: target 'role in web': column 9: expected '('"),
            "{}",
            stderr(&out)
        );

        // Scopes use the same grammar: a token scoped to a selector
        // reaches the agents it selects and no other.
        let token = cluster
            .cli_ok(&[
                "token",
                "create",
                "--kind",
                "api",
                "--role",
                "operator",
                "--scope-target",
                "role in (web,api),!env=prod",
            ])
            .trim()
            .to_owned();
        let scoped = |args: &[&str]| {
            cluster
                .cli_command(args)
                .env("DROVER_TOKEN", &token)
                .output()
                .unwrap()
        };
        let out = scoped(&["run", "echo", "--target", "*", "--param", "message=x"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("outside your scope"),
            "{}",
            stderr(&out)
        );
        let out = scoped(&[
            "run",
            "echo",
            "--target",
            "role=api",
            "--param",
            "message=x",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = cluster.cli(&[
            "token",
            "create",
            "--kind",
            "api",
            "--scope-target",
            "role in (",
        ]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("column 10: invalid value"),
            "{}",
            stderr(&out)
        );
    }
}

/// `group` is not a label: `agents label ID group=web` is refused with the
/// command that sets it, and `agents set-group` moves an agent; facts
/// cannot be set as labels either.
#[tokio::test]
async fn group_is_set_with_set_group_and_facts_are_reserved() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        let agent = cluster.enroll_agent(&["--label", "role=web"]).await;
        cluster.wait_online(&agent.id).await;
        let id = agent.id.as_str();

        let out = cluster.cli(&["agents", "label", id, "group=web"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(
                "'group' is not a label: set an agent's group with drover agents set-group ID GROUP"
            ),
            "{}",
            stderr(&out)
        );
        let out = cluster.cli(&["agents", "label", id, "os=plan9"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("label 'os' is reported by the agent itself and cannot be set"),
            "{}",
            stderr(&out)
        );
        let out = cluster.cli(&["token", "create", "--label", "group=web"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out)
                .contains("'group' is not a label: give the enrolled agent its group with --group"),
            "{}",
            stderr(&out)
        );
        let out = cluster.cli(&["token", "create", "--label", "arch=z80"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("label 'arch' is reported"),
            "{}",
            stderr(&out)
        );

        let printed = cluster.cli_ok(&["agents", "set-group", &id[..8], "web"]);
        assert_eq!(printed, format!("{id}\tweb\n"));
        assert_eq!(cluster.agent(id).group.as_deref(), Some("web"));
        assert_eq!(selected(&cluster, "group:web,role=web"), set(&[id]));
        let out = cluster.cli(&["agents", "set-group", id, "no/slash"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("group name 'no/slash' is invalid"),
            "{}",
            stderr(&out)
        );
        cluster.cli_ok(&["agents", "set-group", id, "--clear"]);
        assert_eq!(cluster.agent(id).group, None);
        assert!(selected(&cluster, "group:web").is_empty());
        let out = cluster.cli(&["agents", "set-group", id]);
        assert!(!out.status.success(), "a group or --clear is required");
    }
}

/// A revoked agent shows `-` for dispatch; `agents rm` refuses a live one,
/// removes a revoked one (by id prefix) from listings and targets, and the
/// jobs it ran keep their history.
#[tokio::test]
async fn revoked_agents_show_no_dispatch_and_can_be_removed() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let gone = cluster.enroll_agent(&["--label", "role=old"]).await;
        let stays = cluster.enroll_agent(&["--label", "role=new"]).await;
        cluster.wait_online(&gone.id).await;
        cluster.wait_online(&stays.id).await;
        let id = gone.id.as_str();
        let job = cluster.submit("echo", id, &["--param", "message=before"]);
        cluster.wait_job(&job, Duration::from_secs(30)).await;

        let out = cluster.cli(&["agents", "rm", id]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(&format!("agent {id} is not revoked: revoke it first")),
            "{}",
            stderr(&out)
        );

        cluster.cli_ok(&["agents", "revoke", id]);
        let list = cluster.cli_ok(&["agents", "list"]);
        let row: Vec<&str> = list
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(row[2], "revoked", "{list}");
        assert_eq!(row[3], "-", "DISPATCH of a revoked agent: {list}");
        let live: Vec<&str> = list
            .lines()
            .find(|l| l.starts_with(&stays.id))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(live[3], "active", "{list}");
        let show = cluster.cli_ok(&["agents", "show", id]);
        assert!(
            show.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["dispatch:", "-"]),
            "{show}"
        );

        assert_eq!(
            cluster.cli_ok(&["agents", "rm", &id[..23]]),
            format!("removed agent {id}\n")
        );
        let ids: Vec<String> = cluster.agents().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![stays.id.clone()]);
        let out = cluster.cli(&["agents", "show", id]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
        let out = cluster.cli(&["run", "echo", "--target", id, "--param", "message=x"]);
        assert!(
            stderr(&out).contains("matches no agent"),
            "{}",
            stderr(&out)
        );
        assert!(selected(&cluster, "role=old").is_empty());
        let out = cluster.cli(&["agents", "rm", id]);
        assert!(!out.status.success(), "removed twice");

        // Its job's history still names it.
        let j = cluster.job(&job);
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.attempts[0].agent_id, id);
        assert!(cluster.cli_ok(&["jobs", "show", &job]).contains(&id[..13]));
    }
}

/// `actions show` and `actions rm`, `sandboxes rm`: a profile an action
/// names is kept (naming the action), built-ins stay, and removing an
/// action leaves a job already made from it running to its end.
#[tokio::test]
async fn actions_and_sandboxes_can_be_shown_and_removed() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;

        let text = cluster.cli_ok(&["actions", "show", "echo"]);
        assert!(
            text.contains("argv:") && text.contains("/bin/echo"),
            "{text}"
        );
        assert!(text.contains("param message:"), "{text}");
        let a: Action = cluster.cli_json(&["actions", "show", "limited-echo"]);
        assert_eq!(a.spec.sandbox.as_deref(), Some("tight"));
        let noop: Action = cluster.cli_json(&["actions", "show", "noop"]);
        assert_eq!(noop.spec.name, "noop");
        let out = cluster.cli(&["actions", "show", "nosuch"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("action 'nosuch' not found"),
            "{}",
            stderr(&out)
        );

        let out = cluster.cli(&["sandboxes", "rm", "tight"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("sandbox 'tight' is used by action(s) limited-echo"),
            "{}",
            stderr(&out)
        );
        let out = cluster.cli(&["sandboxes", "rm", "process"]);
        assert!(stderr(&out).contains("built in"), "{}", stderr(&out));
        let out = cluster.cli(&["actions", "rm", "noop"]);
        assert!(stderr(&out).contains("built in"), "{}", stderr(&out));

        // A running job outlives its action.
        let job = cluster.submit("sleep", &agent.id, &["--param", "seconds=1"]);
        assert_eq!(
            cluster.cli_ok(&["actions", "rm", "sleep"]),
            "removed action sleep\n"
        );
        let done = cluster.wait_job(&job, Duration::from_secs(30)).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        let out = cluster.cli(&[
            "run",
            "sleep",
            "--target",
            &agent.id,
            "--param",
            "seconds=1",
        ]);
        assert!(stderr(&out).contains("unknown action"), "{}", stderr(&out));

        cluster.cli_ok(&["actions", "rm", "limited-echo"]);
        assert_eq!(
            cluster.cli_ok(&["sandboxes", "rm", "tight"]),
            "removed sandbox tight\n"
        );
        let list = cluster.cli_ok(&["sandboxes", "list"]);
        assert!(!list.contains("tight"), "{list}");
        let list = cluster.cli_ok(&["actions", "list"]);
        assert!(
            !list.contains("limited-echo") && list.contains("echo"),
            "{list}"
        );
        let out = cluster.cli(&["sandboxes", "rm", "tight"]);
        assert!(
            stderr(&out).contains("sandbox 'tight' not found"),
            "{}",
            stderr(&out)
        );
    }
}

/// `webhooks rm` takes an id prefix like every other command, and integer
/// parameters are echoed as numbers.
#[tokio::test]
async fn webhook_prefixes_and_typed_parameters() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(CATALOG);
        let agent = cluster.enroll_agent(&[]).await;
        cluster.wait_online(&agent.id).await;

        let hook = cluster
            .cli_ok(&[
                "webhooks",
                "add",
                "--url",
                "https://example.com/hook",
                "--secret",
                "0123456789abcdef0123",
            ])
            .trim()
            .to_owned();
        cluster.cli_ok(&["webhooks", "rm", &hook[..8]]);
        let list = cluster.cli_ok(&["webhooks", "list"]);
        assert!(!list.contains(&hook), "{list}");
        let out = cluster.cli(&["webhooks", "rm", &hook[..8]]);
        assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

        let job = cluster.submit("sleep", &agent.id, &["--param", "seconds=0"]);
        let j = cluster.job(&job);
        assert_eq!(j.params["seconds"], serde_json::json!(0), "{:?}", j.params);
        let echo = cluster.submit("echo", &agent.id, &["--param", "message=3"]);
        assert_eq!(cluster.job(&echo).params["message"], serde_json::json!("3"));
        let text = cluster.cli_ok(&["jobs", "show", &job]);
        assert!(text.contains(r#"{"seconds":0}"#), "{text}");
    }
}
