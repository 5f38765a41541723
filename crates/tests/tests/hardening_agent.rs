//! Issue 12 ("Hardening"), the agent's and the CLI's points, each through
//! real processes: artifacts never reach past a symlink or past what the
//! task's own user may read (point 1), a workspace clones a local
//! repository only under the agent's `workspace_local_roots` (point 6),
//! and `drover workflow artifacts --download` writes nothing outside its
//! directory whatever the server names (point 9).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_proto::workflows::{Artifact, Run, RunState, TaskRun, TaskState, WorkspaceState};
use drover_tests::*;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The catalog: tasks that run as `nobody` and try to make the agent
/// collect what `nobody` cannot read. `SECRET` is replaced by a directory
/// only root may enter.
const CATALOG: &str = r#"
sandboxes:
  - name: nobody
    type: process
    user: nobody
actions:
  - name: plant-link
    description: Links d to a directory nobody cannot enter, and tries to read through it
    argv: ["/bin/sh", "-c", "ln -s SECRET d; cat d/secret || echo the task cannot read it"]
    sandbox: nobody
  - name: lock-own-file
    description: Writes a file, then takes its own read permission away
    argv: ["/bin/sh", "-c", "echo mine > locked; chmod 000 locked"]
    sandbox: nobody
  - name: mixed-dir
    description: A directory with a file of its own and symlinks out of it
    argv: ["/bin/sh", "-c", "mkdir out; echo fine > out/ok.txt; ln -s SECRET/secret out/leak; ln -s SECRET out/dir"]
    sandbox: nobody
  - name: noop-nobody
    argv: ["/bin/true"]
    sandbox: nobody
"#;

/// A directory only root may enter, with a secret file in it.
fn secret_dir(cluster: &Cluster) -> PathBuf {
    let dir = cluster.dir.path().join("root-only");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), "TOP SECRET\n").unwrap();
    std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// A cluster with the catalog and one agent with `yaml` added to the
/// default agent.yaml.
async fn cluster_with_agent(yaml: &str) -> (Cluster, AgentProc, PathBuf) {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let secret = secret_dir(&cluster);
    cluster.apply_actions(&CATALOG.replace("SECRET", secret.to_str().unwrap()));
    let agent = cluster
        .enroll_agent_with(&[], &format!("{DEFAULT_AGENT_YAML}{yaml}"))
        .await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent, secret)
}

async fn submit_run(cluster: &Cluster, yaml: &str) -> Run {
    let resp = cluster
        .http
        .post(format!("{}/api/v1/workflows/runs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"definition": yaml, "source": "hardening.yaml"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn wait_run_end(cluster: &Cluster, id: &str) -> Run {
    wait_for("the run to end", Duration::from_secs(60), || {
        let r: Run = cluster.cli_json(&["workflow", "status", id]);
        async move { r.state.is_final().then_some(r) }
    })
    .await
}

async fn wait_workspace_end(cluster: &Cluster, id: &str) -> Run {
    wait_for("the workspace to end", Duration::from_secs(30), || {
        let r: Run = cluster.cli_json(&["workflow", "status", id]);
        async move {
            r.workspace
                .as_ref()
                .is_some_and(|w| w.state.is_final())
                .then_some(r)
        }
    })
    .await
}

fn task<'a>(run: &'a Run, id: &str) -> &'a TaskRun {
    run.tasks.iter().find(|t| t.id == id).expect("task")
}

/// The error of a task's (last) attempt.
fn attempt_error(cluster: &Cluster, t: &TaskRun) -> String {
    let job = cluster.job(t.job_id.as_deref().expect("the task has a job"));
    job.attempts
        .last()
        .and_then(|a| a.error.clone())
        .unwrap_or_default()
}

/// The error of the attempt that created (or failed to create) a run's
/// workspace.
fn create_error(cluster: &Cluster, run: &Run) -> String {
    let ws = run.workspace.as_ref().expect("the run has a workspace");
    let job = cluster.job(ws.create_job.as_deref().expect("a create job"));
    job.attempts
        .last()
        .and_then(|a| a.error.clone())
        .unwrap_or_default()
}

fn artifacts(cluster: &Cluster, run: &str) -> Vec<Artifact> {
    cluster.cli_json(&["workflow", "artifacts", run])
}

/// Point 1: a task as `nobody` plants `d -> <root-only dir>` and declares
/// `d/secret`; it cannot read it itself, and the agent (root) does not
/// collect it either. A file the task made unreadable to itself is not
/// collected (the agent reads as the task's user); in a declared
/// directory, symlinks out are skipped and the task's own file comes back.
#[tokio::test]
async fn artifacts_never_follow_symlinks_or_read_beyond_the_task_user() {
    let (cluster, agent, secret) = cluster_with_agent("").await;
    let yaml = format!(
        "name: leak\ndefaults: {{target: '{}'}}\ntasks:\n  \
         - {{id: plant, action: plant-link, artifacts: [d/secret]}}\n  \
         - {{id: lock, action: lock-own-file, artifacts: [locked]}}\n  \
         - {{id: dir, action: mixed-dir, artifacts: [out]}}\n",
        agent.id
    );
    let run = submit_run(&cluster, &yaml).await;
    let run = wait_run_end(&cluster, &run.id).await;
    assert_eq!(run.state, RunState::Failed, "{run:#?}");

    let plant = task(&run, "plant");
    assert_eq!(plant.state, TaskState::Failed, "{plant:#?}");
    assert_eq!(
        attempt_error(&cluster, plant),
        "artifact 'd/secret' is or passes through a symlink; symlinks are never followed"
    );
    // The task itself was refused by the kernel.
    let out = cluster.cli(&["jobs", "logs", plant.job_id.as_deref().unwrap()]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains("Permission denied") && logs.contains("the task cannot read it"),
        "{logs}"
    );
    assert!(!logs.contains("TOP SECRET"), "{logs}");

    let lock = task(&run, "lock");
    assert_eq!(lock.state, TaskState::Failed, "{lock:#?}");
    assert_eq!(
        attempt_error(&cluster, lock),
        "artifact 'locked' cannot be read by the user the attempt ran as"
    );

    let dir = task(&run, "dir");
    assert_eq!(dir.state, TaskState::Succeeded, "{dir:#?}");
    let list = artifacts(&cluster, &run.id);
    let paths: Vec<(Option<&str>, &str)> = list
        .iter()
        .map(|a| (a.task.as_deref(), a.path.as_str()))
        .collect();
    assert_eq!(paths, [(Some("dir"), "out/ok.txt")], "{list:#?}");
    assert_eq!(list[0].sha256, hex::encode(Sha256::digest(b"fine\n")));

    // Nothing of the secret reached the server's artifact store.
    let stored = cluster.data_dir().join("artifacts");
    for entry in walk(&stored) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("TOP SECRET"),
            "{} holds the secret",
            entry.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(secret.join("secret")).unwrap(),
        "TOP SECRET\n"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A git repository at `dir` with a README and a committed symlink
/// `link -> target`.
fn git_repo_with_link(dir: &Path, target: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .expect("git is required (scripts/test installs it)");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README.md"), "hello\n").unwrap();
    std::os::unix::fs::symlink(target, dir.join("link")).unwrap();
    git(&["add", "README.md", "link"]);
    git(&["commit", "-q", "-m", "one"]);
    dir.to_str().unwrap().to_owned()
}

fn workspace_run(agent: &AgentProc, repo: &str, artifacts: &str) -> String {
    format!(
        "name: ws\nworkspace:\n  target: {}\n  sandbox: nobody\n  git: {{repo: '{repo}'}}\n\
         tasks:\n  - {{id: t, action: noop-nobody, artifacts: [{artifacts}]}}\n",
        agent.id
    )
}

/// Points 1 and 6 with a workspace: a local repository is cloned only
/// under the agent's `workspace_local_roots` (not at all by default, nor
/// through `file://`, `..` or a symlink out of a root); under a root it
/// is, and a symlink committed to it never lets a task's artifacts reach
/// the root-only directory it points to.
#[tokio::test]
async fn workspaces_clone_local_repositories_only_under_the_roots() {
    // An agent with no roots: no local repository at all.
    let (cluster, agent, secret) = cluster_with_agent("").await;
    let repos = cluster.dir.path().join("repos");
    let repo = git_repo_with_link(&repos.join("app"), &secret);
    for source in [repo.clone(), format!("file://{repo}")] {
        let run = submit_run(&cluster, &workspace_run(&agent, &source, "README.md")).await;
        let run = wait_run_end(&cluster, &run.id).await;
        assert_eq!(run.state, RunState::Failed, "{source}: {run:#?}");
        let want = format!("git.repo '{source}' is a path on this agent, and this agent clones local repositories only under its workspace_local_roots (none set)");
        assert_eq!(create_error(&cluster, &run), want);
        let why = run.reason.clone().unwrap_or_default();
        assert!(why.contains("workspace_local_roots"), "{source}: {why}");
        assert_eq!(task(&run, "t").state, TaskState::Skipped);
        let run = wait_workspace_end(&cluster, &run.id).await;
        assert_eq!(run.workspace.unwrap().state, WorkspaceState::Removed);
    }

    // An agent whose agent.yaml lists the repositories' directory.
    let roots = format!("workspace_local_roots: ['{}']\n", repos.display());
    let rooted = cluster
        .enroll_agent_with(&[], &format!("{DEFAULT_AGENT_YAML}{roots}"))
        .await;
    cluster.wait_online(&rooted.id).await;
    let other = cluster.dir.path().join("other");
    let outside = git_repo_with_link(&other.join("app"), &secret);
    std::os::unix::fs::symlink(&other, repos.join("other")).unwrap();
    for source in [
        outside.clone(),
        format!("{}/../other/app", repos.display()),
        format!("{}/other/app", repos.display()),
    ] {
        let run = submit_run(&cluster, &workspace_run(&rooted, &source, "README.md")).await;
        let run = wait_run_end(&cluster, &run.id).await;
        assert_eq!(run.state, RunState::Failed, "{source}: {run:#?}");
        let want = format!(
            "git.repo '{source}' is a path on this agent, and this agent clones local repositories only under its workspace_local_roots ({})",
            repos.display()
        );
        assert_eq!(create_error(&cluster, &run), want);
    }

    // Under the root: cloned, and the task's artifacts come from it ...
    let run = submit_run(&cluster, &workspace_run(&rooted, &repo, "README.md")).await;
    let run = wait_run_end(&cluster, &run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:#?}");
    let list = artifacts(&cluster, &run.id);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0].path, "README.md");

    // ... but never through the symlink committed to the repository.
    let run = submit_run(&cluster, &workspace_run(&rooted, &repo, "link/secret")).await;
    let run = wait_run_end(&cluster, &run.id).await;
    assert_eq!(run.state, RunState::Failed, "{run:#?}");
    let t = task(&run, "t");
    assert_eq!(t.state, TaskState::Failed, "{t:#?}");
    assert_eq!(
        attempt_error(&cluster, t),
        "artifact 'link/secret' is or passes through a symlink; symlinks are never followed"
    );
    assert!(artifacts(&cluster, &run.id).is_empty());
}

/// The run the stand-in server is asked about.
const RUN_ID: &str = "0192f0c3-7a1e-7d2b-9f00-1234567890ab";

/// What the stand-in server serves as every artifact's bytes.
const BODY: &[u8] = b"from the server\n";

/// A stand-in server on loopback that lists `listed` as a run's
/// artifacts and serves every artifact's bytes as `BODY`.
fn fake_server(listed: serde_json::Value) -> String {
    use axum::http::Uri;
    use axum::response::IntoResponse;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let handler = move |uri: Uri| {
                let listed = listed.clone();
                async move {
                    if uri.path().ends_with("/artifacts") {
                        axum::Json(listed).into_response()
                    } else {
                        let sha = hex::encode(Sha256::digest(BODY));
                        ([(drover_proto::workflows::SHA256_HEADER, sha)], BODY).into_response()
                    }
                }
            };
            let app = axum::Router::new().fallback(handler);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(listener, app).await;
        });
    });
    url
}

fn listed(task: &str, path: &str) -> serde_json::Value {
    json!([{
        "id": "0192f0c3-aaaa",
        "run_id": RUN_ID,
        "task": task,
        "job_id": "job1",
        "attempt_id": "att1",
        "path": path,
        "size": BODY.len(),
        "sha256": hex::encode(Sha256::digest(BODY)),
        "created_at": "2026-11-30T10:00:00Z",
    }])
}

fn download(server: &str, home: &Path, dir: &Path) -> std::process::Output {
    Command::new(bin("drover"))
        .args(["workflow", "artifacts", RUN_ID, "--download"])
        .arg(dir)
        .env("DROVER_SERVER", server)
        .env("DROVER_TOKEN", "any-token")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .output()
        .expect("run drover")
}

/// Point 9: a server that names a task `../../x` or an absolute path gets
/// nothing written outside the download dir (nor anywhere); a plain
/// answer of the same server is saved where it belongs.
#[tokio::test]
async fn downloads_stay_in_their_directory_whatever_the_server_names() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let dl = base.join("a/b");
    let absolute = base.join("absolute");

    // The same server, answering plainly: the file lands in DIR/task/path.
    let server = fake_server(listed("build", "out/ok.txt"));
    let out = download(&server, base, &dl);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dl.join("build/out/ok.txt")).unwrap(), BODY);

    let absolute_task = absolute.to_str().unwrap().to_owned();
    let cases = [
        ("../../escaped", "x.txt", base.join("escaped/x.txt")),
        (absolute_task.as_str(), "x.txt", absolute.join("x.txt")),
        ("..", "x.txt", base.join("a/x.txt")),
    ];
    for (task, path, target) in cases {
        let server = fake_server(listed(task, path));
        let out = download(&server, base, &dl);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{task}: {err}");
        assert!(
            err.contains(&format!(
                "the server named an artifact's task '{task}', which is not a plain name; nothing was downloaded"
            )),
            "{task}: {err}"
        );
        assert!(!target.exists(), "{task}: wrote {}", target.display());
    }
    assert!(!base.join("escaped").exists());
    assert!(!absolute.exists());
}
