//! Workspaces end to end: created from a local git repository (process and
//! docker), used by tasks that see the checkout and each other's files,
//! created twice, removed without a trace; bad git sources refused before
//! git runs; and stops that kill an exec's whole process tree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use drover_proto::jobs::{Assignment, Outcome};
use drover_proto::sandbox::{
    GitSource, Sandbox, WorkspaceSpec, BUILTIN_WORKSPACE_CREATE, BUILTIN_WORKSPACE_REMOVE,
    WORKSPACE_ACTION,
};

use crate::docker::workspace_name;
use crate::docker_tests::Env;
use crate::executor::{ExecOptions, Stop};
use crate::test_support::{assignment, process_opts, rt, run_stopped_after_output, run_with, Run};
use crate::workspace::{dir, meta_dir};

/// A git repository with a tagged first commit (`v1`) and a second one on
/// `main`.
fn git_repo(root: &Path) -> String {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git is installed (scripts/test installs it)");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    let commit = [
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-q",
    ];
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("file.txt"), "v1\n").unwrap();
    git(&["add", "file.txt"]);
    git(&[&commit[..], &["-m", "one"]].concat());
    git(&["tag", "v1"]);
    std::fs::write(repo.join("file.txt"), "v2\n").unwrap();
    git(&[&commit[..], &["-a", "-m", "two"]].concat());
    repo.to_string_lossy().into_owned()
}

/// `opts` that clone local repositories under `root`.
fn cloning_under(opts: ExecOptions, root: &Path) -> ExecOptions {
    ExecOptions {
        workspace_local_roots: vec![root.to_owned()],
        ..opts
    }
}

fn spec(sandbox: Sandbox, git: Option<(&str, Option<&str>)>) -> WorkspaceSpec {
    WorkspaceSpec {
        id: format!("ws-{:08x}", fastrand::u32(..)),
        sandbox,
        git: git.map(|(repo, r)| GitSource {
            repo: repo.to_owned(),
            reference: r.map(str::to_owned),
        }),
    }
}

fn builtin(which: &str, ws: &WorkspaceSpec) -> Assignment {
    let mut a = assignment(&[which]);
    a.action = WORKSPACE_ACTION.to_owned();
    a.workspace = Some(ws.clone());
    a.timeout_ms = 60_000;
    a
}

fn task(ws: &WorkspaceSpec, argv: &[&str]) -> Assignment {
    let mut a = assignment(argv);
    a.workspace = Some(ws.clone());
    a
}

async fn run(opts: &ExecOptions, a: &Assignment) -> Run {
    run_with(opts, a, &Stop::new()).await
}

#[test]
fn process_workspace_is_checked_out_shared_and_removed() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let repo = git_repo(tmp.path());
        let opts = cloning_under(process_opts(&tmp.path().join("state")), tmp.path());
        let ws = spec(Sandbox::default_process(), Some((&repo, Some("v1"))));

        let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert!(
            r.stderr.contains(&format!("[drover] cloning {repo} at v1")),
            "{r:?}"
        );
        assert!(
            r.stderr
                .contains(&format!("[drover] checked out v1 of {repo} (")),
            "{r:?}"
        );
        assert!(meta_dir(&opts, &ws.id).join("ready").is_file());

        let r = run(
            &opts,
            &task(
                &ws,
                &["sh", "-c", "cat file.txt; pwd; echo hello > by-task-1"],
            ),
        )
        .await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.stdout, format!("v1\n{}\n", dir(&opts, &ws.id).display()));
        let r = run(&opts, &task(&ws, &["cat", "by-task-1"])).await;
        assert_eq!(r.stdout, "hello\n");
        // The workspace outlives its tasks.
        assert!(dir(&opts, &ws.id).join("by-task-1").is_file());

        // A second create (a retry) keeps what is there.
        let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert!(r.stderr.contains("exists already"), "{r:?}");
        assert!(dir(&opts, &ws.id).join("by-task-1").is_file());

        for _ in 0..2 {
            let r = run(&opts, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
            assert!(!dir(&opts, &ws.id).exists());
            assert!(!meta_dir(&opts, &ws.id).exists());
        }
        // Nothing of the builtins' own is left in the work root.
        assert_eq!(std::fs::read_dir(&opts.work_root).unwrap().count(), 0);
    });
}

#[test]
fn bad_git_sources_are_refused_before_git_runs() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let repo = git_repo(tmp.path());
        let opts = cloning_under(process_opts(&tmp.path().join("state")), tmp.path());
        let pwned = tmp.path().join("pwned");
        // No space in it: refused for its transport, not its spaces.
        let ext = format!("ext::touch%{}", pwned.display());
        let cases = [
            (repo.as_str(), Some("--upload-pack=touch /tmp/x"), "git.ref"),
            (repo.as_str(), Some("-b"), "git.ref"),
            (ext.as_str(), None, "'ext::' transport is refused"),
            ("--upload-pack=id", None, "must not start with '-'"),
        ];
        for (repo, reference, want) in cases {
            let ws = spec(Sandbox::default_process(), Some((repo, reference)));
            let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Rejected, "{r:?}");
            let err = r.result.error.unwrap();
            assert!(err.contains(want), "{repo} {reference:?}: {err}");
            assert!(r.chunks.is_empty(), "git ran: {:?}", r.chunks);
            assert!(!dir(&opts, &ws.id).exists());
        }
        assert!(!pwned.exists());

        // A ref the repository lacks fails, naming it, and leaves nothing.
        let ws = spec(Sandbox::default_process(), Some((&repo, Some("nope"))));
        let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(
            r.result.error.as_deref(),
            Some(format!("git checkout of {repo} at nope failed: the repository has no branch, tag or commit named 'nope'").as_str())
        );
        assert!(!dir(&opts, &ws.id).exists());
        assert!(!meta_dir(&opts, &ws.id).exists());
    });
}

#[test]
fn local_repositories_are_cloned_only_under_the_roots() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let outside = git_repo(tmp.path());
        let allowed = tmp.path().join("allowed");
        let inside = git_repo(&allowed);
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        let state = tmp.path().join("state");
        let none = process_opts(&state);
        let some = cloning_under(process_opts(&state), &allowed);
        let roots = allowed.display().to_string();
        let escape = format!("{}/../repo", allowed.display());
        let link = format!("{}/link", allowed.display());
        let file_url = format!("file://{outside}");
        // (options, git.repo, the roots the refusal names)
        let refused = [
            (&none, outside.as_str(), "none set"),
            (&none, file_url.as_str(), "none set"),
            (&none, inside.as_str(), "none set"),
            (&some, outside.as_str(), roots.as_str()),
            (&some, file_url.as_str(), roots.as_str()),
            (&some, escape.as_str(), roots.as_str()),
            (&some, link.as_str(), roots.as_str()),
            (&some, "repo", roots.as_str()),
            (&some, "/no/such/repo", roots.as_str()),
        ];
        for (opts, repo, named) in refused {
            let ws = spec(Sandbox::default_process(), Some((repo, None)));
            let r = run(opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Rejected, "{repo}: {r:?}");
            let err = r.result.error.unwrap();
            assert_eq!(
                err,
                format!("git.repo '{repo}' is a path on this agent, and this agent clones local repositories only under its workspace_local_roots ({named})")
            );
            assert!(r.chunks.is_empty(), "git ran: {:?}", r.chunks);
            assert!(!dir(opts, &ws.id).exists());
        }
        // Under a root, as a path or a file:// URL, it is cloned.
        for repo in [inside.clone(), format!("file://{inside}")] {
            let ws = spec(Sandbox::default_process(), Some((&repo, Some("v1"))));
            let r = run(&some, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{repo}: {r:?}");
            assert_eq!(
                std::fs::read_to_string(dir(&some, &ws.id).join("file.txt")).unwrap(),
                "v1\n"
            );
            let r = run(&some, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        }
    });
}

#[test]
fn docker_workspace_runs_tasks_in_its_container() {
    rt().block_on(async {
        let env = Env::new("ws-docker").await;
        let tmp = tempfile::tempdir().unwrap();
        let repo = git_repo(tmp.path());
        let opts = cloning_under(env.opts.clone(), tmp.path());
        let ws = spec(
            env.sandbox(serde_json::json!({"user": "65534:65534", "memory": "64m"})),
            Some((&repo, None)),
        );
        let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        let name = workspace_name(&ws.id);
        let (containers, volumes) = env.labelled().await;
        assert_eq!(containers, vec![format!("/{name}")]);
        assert_eq!(volumes, vec![name.clone()]);

        let r = run(
            &opts,
            &task(
                &ws,
                &[
                    "sh",
                    "-c",
                    "cat file.txt; id -u; pwd; echo hi > by-task-1; echo '::set-output name=x=1'; \
                     printf '{\"y\": \"2\"}' > \"$DROVER_OUTPUT\"",
                ],
            ),
        )
        .await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        // The default branch, as the profile's user, in /workspace.
        assert_eq!(r.stdout, "v2\n65534\n/workspace\n::set-output name=x=1\n");
        let outputs: Vec<(&str, &str)> = r
            .result
            .outputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(outputs, vec![("x", "1"), ("y", "2")]);
        let r = run(&opts, &task(&ws, &["sh", "-c", "cat by-task-1; exit 3"])).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(r.result.exit_code, Some(3));
        assert_eq!(r.stdout, "hi\n");

        // An exec that goes beyond the workspace's memory is reported so.
        let r = run(&opts, &task(&ws, &["tail", "/dev/zero"])).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(
            r.result.error.as_deref(),
            Some("killed: exceeded its memory limit of 64m"),
            "{r:?}"
        );

        let r = run(&opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert!(r.stderr.contains("exists already"), "{r:?}");

        for _ in 0..2 {
            let r = run(&opts, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
            assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
            assert!(!dir(&opts, &ws.id).exists());
            assert!(!meta_dir(&opts, &ws.id).exists());
            env.assert_clean().await;
        }
        // A task of a workspace that is gone fails clearly.
        let r = run(&opts, &task(&ws, &["true"])).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert!(r.result.error.unwrap().contains("has no container"));
    });
}

#[test]
fn a_container_task_in_a_process_workspace_sees_it_at_workspace() {
    rt().block_on(async {
        let env = Env::new("ws-mixed").await;
        let ws = spec(Sandbox::default_process(), None);
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        std::fs::write(dir(&env.opts, &ws.id).join("note"), "from the host\n").unwrap();
        let mut a = task(&ws, &["sh", "-c", "pwd; cat note; echo back > reply"]);
        a.sandbox = Some(env.sandbox(serde_json::json!({})));
        let r = run(&env.opts, &a).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.stdout, "/workspace\nfrom the host\n");
        assert_eq!(
            std::fs::read_to_string(dir(&env.opts, &ws.id).join("reply")).unwrap(),
            "back\n"
        );
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        env.assert_clean().await;
    });
}

/// Whether the process whose pid a task wrote to `bg.pid` still runs in
/// the workspace's container.
async fn background_alive(opts: &ExecOptions, ws: &WorkspaceSpec) -> String {
    let r = run(
        opts,
        &task(
            ws,
            &[
                "sh",
                "-c",
                "if kill -0 \"$(cat bg.pid)\" 2>/dev/null; then echo alive; else echo gone; fi",
            ],
        ),
    )
    .await;
    r.stdout
}

#[test]
fn stopping_an_exec_kills_its_process_tree() {
    rt().block_on(async {
        let env = Env::new("ws-stop").await;
        let ws = spec(env.sandbox(serde_json::json!({})), None);
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        let busy = "sleep 300 & echo $! > bg.pid; echo up; sleep 300";

        // The check sees a background process while its task runs; once
        // the task ends, what it left behind is killed, like the process
        // group of a process.
        let check = "if kill -0 \"$(cat bg.pid)\"; then echo alive; fi";
        let r = run(
            &env.opts,
            &task(
                &ws,
                &[
                    "sh",
                    "-c",
                    &format!("sleep 300 & echo $! > bg.pid; {check}"),
                ],
            ),
        )
        .await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.stdout, "alive\n");
        assert_eq!(background_alive(&env.opts, &ws).await, "gone\n");

        // Timeout of a task that ignores SIGTERM: SIGKILL after the grace.
        let mut a = task(&ws, &["sh", "-c", &format!("trap '' TERM; {busy}")]);
        a.timeout_ms = 2_000;
        a.kill_grace_ms = 1_000;
        let r = run(&env.opts, &a).await;
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGKILL), "{r:?}");
        assert_eq!(r.stdout, "up\n");
        assert!(r.elapsed >= Duration::from_millis(2_900), "{:?}", r.elapsed);
        assert_eq!(background_alive(&env.opts, &ws).await, "gone\n");

        // Cancel: SIGTERM to the tree.
        let a = task(&ws, &["sh", "-c", busy]);
        let r =
            run_stopped_after_output(&env.opts, &a, &[(Duration::from_millis(200), false)]).await;
        assert_eq!(r.result.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGTERM), "{r:?}");
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
        assert_eq!(background_alive(&env.opts, &ws).await, "gone\n");

        // A forced stop skips the grace.
        let mut a = task(&ws, &["sh", "-c", &format!("trap '' TERM; {busy}")]);
        a.kill_grace_ms = 60_000;
        let r = run_stopped_after_output(
            &env.opts,
            &a,
            &[
                (Duration::from_millis(200), false),
                (Duration::from_millis(600), true),
            ],
        )
        .await;
        assert_eq!(r.result.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGKILL), "{r:?}");
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
        assert_eq!(background_alive(&env.opts, &ws).await, "gone\n");

        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        env.assert_clean().await;
    });
}

#[test]
fn a_retried_create_that_cannot_ask_the_engine_touches_nothing() {
    rt().block_on(async {
        let env = Env::new("ws-away").await;
        let ws = spec(env.sandbox(serde_json::json!({})), None);
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        std::fs::write(dir(&env.opts, &ws.id).join("work"), "precious").unwrap();
        // The same agent, its engine away for a moment.
        let away = ExecOptions {
            docker: Some(std::sync::Arc::new(crate::docker::Engine::new(
                crate::config::DockerHost::Unix("/nonexistent/docker.sock".into()),
                &env.agent_id,
            ))),
            ..env.opts.clone()
        };
        let r = run(&away, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert!(r.result.error.unwrap().contains("unreachable"));
        assert_eq!(
            std::fs::read_to_string(dir(&env.opts, &ws.id).join("work")).unwrap(),
            "precious"
        );
        // Back: the workspace is still complete.
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_CREATE, &ws)).await;
        assert!(r.stderr.contains("exists already"), "{r:?}");
        let r = run(&env.opts, &builtin(BUILTIN_WORKSPACE_REMOVE, &ws)).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        env.assert_clean().await;
    });
}
