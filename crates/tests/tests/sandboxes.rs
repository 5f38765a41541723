//! Sandboxes, workspaces, capacity and stops, with real processes and the
//! real Docker engine: limits that are enforced (memory, pids, network,
//! read-only root, CPU time, open files, an unprivileged user), runtimes
//! an agent lacks refused, containers cleaned up after an agent is killed,
//! workspaces with a git checkout shared by a run's tasks and removed when
//! it ends, drained and stopped agents, and the fleet-wide emergency stop.
//!
//! Tests that need Docker fail loudly when the engine or the test image is
//! missing (`docker_image()`); `scripts/test` provides both.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_proto::workflows::{Run, RunState, TaskState, WorkspaceState};
use drover_tests::*;
use serde_json::{json, Value};

/// The catalog every test applies: sandbox profiles and the actions that
/// run in them. `IMAGE` is replaced by the test image.
const CATALOG: &str = r#"
sandboxes:
  - name: tight
    type: docker
    image: IMAGE
    memory: 64m
    pids: 32
    cpus: 1
  - name: open
    type: docker
    image: IMAGE
    network: bridge
  - name: closed
    type: docker
    image: IMAGE
  - name: gvisor
    type: docker
    image: IMAGE
    runtime: runsc
  - name: limited
    type: process
    cpu_time: 1s
    open_files: 64
    address_space: 256m
  - name: nobody
    type: process
    user: nobody
    processes: 200
actions:
  - name: hog
    description: Holds 200 MB in memory
    argv: ["/bin/sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo held ${#x}"]
    sandbox: tight
    timeout: 60s
  - name: forkbomb
    argv: ["/bin/sh", "-c", "echo started; bomb() { bomb | bomb & }; bomb; sleep 30"]
    sandbox: tight
    timeout: 6s
    kill_grace: 1s
  - name: forkloop
    description: Starts up to 100 long-lived processes, counting them
    argv: ["/bin/sh", "-c", "n=0; while [ $n -lt 100 ]; do sleep 300 & n=$((n+1)); echo $n; done; echo all started"]
    sandbox: tight
    timeout: 20s
    kill_grace: 1s
  - name: probe
    description: GET /healthz of a server, raw over TCP
    argv: ["/bin/sh", "-c", '(printf "GET /healthz HTTP/1.0\r\n\r\n"; sleep 2) | nc -w 3 "$1" "$2"', "sh", "{{host}}", "{{port}}"]
    params:
      host: {type: string, pattern: "[0-9.]+"}
      port: {type: integer, min: 1, max: 65535}
    sandbox: open
    timeout: 20s
  - name: rootfs
    argv: ["/bin/sh", "-c", "touch /x; touch /tmp/y && echo tmp-ok; touch /work/z && echo work-ok; grep -E 'CapEff|NoNewPrivs' /proc/self/status; id -u"]
    sandbox: closed
  - name: echo
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
  - name: echo-gvisor
    argv: ["/bin/echo", "{{message}}"]
    params:
      message: {type: string, max_length: 200}
    sandbox: gvisor
  - name: sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    timeout: 120s
    kill_grace: 15s
  - name: stubborn
    description: Ignores SIGTERM; only SIGKILL ends it
    argv: ["/bin/sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.2; done"]
    timeout: 120s
    kill_grace: 20s
  - name: docker-sleep
    argv: ["/bin/sleep", "{{seconds}}"]
    params:
      seconds: {type: integer, min: 0, max: 600}
    sandbox: closed
    timeout: 120s
    kill_grace: 2s
  - name: spin
    argv: ["/bin/sh", "-c", "while true; do :; done"]
    sandbox: limited
    timeout: 30s
  - name: limits
    argv: ["/bin/sh", "-c", "ulimit -n; ulimit -v"]
    sandbox: limited
  - name: whoami
    argv: ["/bin/sh", "-c", "id -u; echo ok > mine.txt && cat mine.txt"]
    sandbox: nobody
  - name: cat
    argv: ["/bin/cat", "{{path}}"]
    params:
      path: {type: string, pattern: "[A-Za-z0-9_.-]+"}
  - name: write
    argv: ["/bin/sh", "-c", 'echo "$2" > "$1"', "sh", "{{path}}", "{{content}}"]
    params:
      path: {type: string, pattern: "[A-Za-z0-9_.-]+"}
      content: {type: string, max_length: 200}
  - name: show
    description: Sets an output to the first line of a file
    argv: ["/bin/sh", "-c", 'echo "::set-output line=$(head -n 1 "$1")"', "sh", "{{path}}"]
    params:
      path: {type: string, pattern: "[A-Za-z0-9_.-]+"}
  - name: fail
    argv: ["/bin/false"]
"#;

fn catalog() -> String {
    CATALOG.replace("IMAGE", &docker_image())
}

async fn cluster_with_agent(backend: Backend, options: ServerOptions) -> (Cluster, AgentProc) {
    let cluster = Cluster::start_with(backend, options).await;
    cluster.apply_actions(&catalog());
    let agent = cluster
        .enroll_agent_with(&["--label", "role=box"], &cloning_here(&cluster))
        .await;
    cluster.wait_online(&agent.id).await;
    (cluster, agent)
}

/// The default agent.yaml, with the cluster's temp dir (where the tests'
/// git repositories are) as a root of local repositories.
fn cloning_here(cluster: &Cluster) -> String {
    format!(
        "{DEFAULT_AGENT_YAML}workspace_local_roots: ['{}']\n",
        cluster.dir.path().display()
    )
}

/// Waits until the agent has reported its Docker engine.
async fn wait_docker(cluster: &Cluster, id: &str) -> Agent {
    wait_for(
        "the agent to report docker",
        Duration::from_secs(20),
        || {
            let a = cluster.agent(id);
            async move {
                let ok = a
                    .inventory
                    .as_ref()
                    .and_then(|i| i.docker.as_ref())
                    .is_some_and(|d| d.available);
                ok.then_some(a)
            }
        },
    )
    .await
}

/// `drover jobs logs ID`, stdout and stderr together.
fn logs(cluster: &Cluster, job: &str) -> String {
    let out = cluster.cli(&["jobs", "logs", job]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until no container or volume of this agent is left.
async fn wait_no_leftovers(agent_id: &str) {
    let id = agent_id.to_owned();
    wait_for(
        "Drover's containers to be removed",
        Duration::from_secs(30),
        || {
            let left = drover_leftovers(&id);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
}

/// `drover run hog` in a docker profile with `memory: 64m` is killed by the
/// engine and reported as killed for memory; the container is removed.
#[tokio::test]
async fn memory_hog_in_a_docker_sandbox_is_killed_for_memory() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    wait_docker(&cluster, &agent.id).await;
    let out = cluster.cli(&["run", "hog", "--target", "docker=true", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("memory"), "{err}");
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    let job = cluster.job(&jobs[0].id);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.sandbox, "tight");
    let a = &job.attempts[0];
    assert_eq!(
        a.limit_exceeded,
        Some(drover_proto::sandbox::LimitExceeded::Memory),
        "{a:?}"
    );
    assert!(a.error.as_deref().unwrap_or("").contains("64m"), "{a:?}");
    let text = cluster.cli_ok(&["jobs", "show", &job.id]);
    assert!(text.contains("memory"), "{text}");
    let metrics = cluster.metrics().await;
    assert!(
        metrics.contains("drover_attempt_limits_exceeded_total{limit=\"memory\"} 1"),
        "{metrics}"
    );
    promtool_check(&metrics);
    wait_no_leftovers(&agent.id).await;
}

/// A container in a `none` network cannot open a socket to the server,
/// while one on the bridge can; the root is read-only with a writable
/// scratch dir, every capability is dropped, no new privileges; a fork
/// bomb is held at the pids limit and the attempt still ends.
#[tokio::test]
async fn docker_limits_are_enforced() {
    let gateway = docker_gateway();
    let options = ServerOptions {
        listen_ip: Some(gateway.clone()),
        // The bridge is not loopback: plain HTTP there is opted into.
        extra_args: vec!["--allow-plain-http".into()],
        ..ServerOptions::default()
    };
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, options).await;
    wait_docker(&cluster, &agent.id).await;
    let host = format!("host={gateway}");
    let port = format!("port={}", cluster.port);

    // The bridge reaches the server: the test could fail.
    let out = cluster.cli(&[
        "run", "probe", "--target", &agent.id, "--param", &host, "--param", &port, "--follow",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (busybox nc stops reading once its input ends: the input stays open
    // until the answer has come, however slow the server.)
    assert!(text.contains("200 OK"), "{text}");
    // `none` does not.
    let out = cluster.cli(&[
        "run",
        "probe",
        "--target",
        &agent.id,
        "--param",
        &host,
        "--param",
        &port,
        "--sandbox",
        "closed",
        "--follow",
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(4), "{all}");
    assert!(all.contains("Network is unreachable"), "{all}");
    assert!(!all.contains("200 OK"), "{all}");

    // Read-only root, writable /tmp and /work, no capabilities.
    let out = cluster.cli(&["run", "rootfs", "--target", &agent.id, "--follow"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("Read-only file system"), "{all}");
    assert!(all.contains("tmp-ok") && all.contains("work-ok"), "{all}");
    assert!(all.contains("CapEff:\t0000000000000000"), "{all}");
    assert!(all.contains("NoNewPrivs:\t1"), "{all}");

    // A fork bomb runs into the pids limit and burns out; the attempt
    // ends and its container goes.
    let job = cluster.submit("forkbomb", &agent.id, &[]);
    let ended = cluster.wait_job(&job, Duration::from_secs(30)).await;
    assert!(
        ended.state.is_final() && ended.state != JobState::Succeeded,
        "{ended:?}"
    );
    let out = logs(&cluster, &job);
    assert!(out.contains("started"), "{out}");
    assert!(out.contains("can't fork"), "{out}");
    // Counted: the limit of 32 (the container's init and shell included)
    // is where forks start to fail.
    let job = cluster.submit("forkloop", &agent.id, &[]);
    let ended = cluster.wait_job(&job, Duration::from_secs(30)).await;
    assert_eq!(ended.state, JobState::Failed, "{ended:?}");
    let out = logs(&cluster, &job);
    let started = out
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        (25..=30).contains(&started),
        "started {started} processes:\n{out}"
    );
    assert!(
        !out.contains("all started") && out.contains("can't fork"),
        "{out}"
    );
    // The server never noticed.
    let metrics = cluster.metrics().await;
    assert!(metrics.contains("drover_agents"), "{metrics}");
    wait_no_leftovers(&agent.id).await;
}

/// Agents report their engine and runtimes; targets select on them; a
/// runtime or an engine the agent lacks is refused with the reason, never
/// run in a weaker sandbox; operators cannot fake those labels.
#[tokio::test]
async fn missing_runtimes_are_refused_and_targets_select_on_docker() {
    let (cluster, with) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let without = cluster
        .enroll_agent_with(
            &["--label", "role=box"],
            "allow_actions: [\"*\"]\ncapacity: 4\ndocker_host: \"off\"\n",
        )
        .await;
    cluster.wait_online(&without.id).await;
    let a = wait_docker(&cluster, &with.id).await;
    let inv = a.inventory.unwrap();
    let engine = inv.docker.unwrap();
    assert!(engine.runtimes.contains(&"runc".to_owned()), "{engine:?}");
    assert!(engine.version.is_some());
    assert!(inv.sandboxes.contains(&"docker".to_owned()));
    let b = cluster.agent(&without.id);
    assert!(b.inventory.unwrap().docker.is_none());

    // docker=true picks the agent with an engine, docker=false the other.
    let job = cluster.submit("echo", "role=box,docker=true", &["--param", "message=hi"]);
    let job = cluster.wait_job(&job, Duration::from_secs(20)).await;
    assert_eq!(job.state, JobState::Succeeded);
    let agents: Vec<&str> = job.attempts.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(agents, vec![with.id.as_str()]);
    let job = cluster.submit("echo", "docker=false", &["--param", "message=hi"]);
    let job = cluster.wait_job(&job, Duration::from_secs(20)).await;
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(job.attempts[0].agent_id, without.id);

    // No engine here offers runsc: refused with the reason.
    let out = cluster.cli(&[
        "run",
        "echo-gvisor",
        "--target",
        &with.id,
        "--param",
        "message=x",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    let refused = cluster.job(&jobs[0].id);
    assert_eq!(refused.state, JobState::Rejected, "{refused:?}");
    let why = refused.attempts[0].error.clone().unwrap_or_default();
    assert!(why.contains("runsc") && why.contains("runc"), "{why}");
    // A target asking for it matches nobody.
    let out = cluster.cli(&[
        "run",
        "echo",
        "--target",
        "docker=true,runtime.runsc=true",
        "--param",
        "message=x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("matches no agent"));
    // A container job for the agent without an engine: refused.
    let out = cluster.cli(&["run", "rootfs", "--target", &without.id, "--wait"]);
    assert_eq!(out.status.code(), Some(4));
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    let refused = cluster.job(&jobs[0].id);
    assert_eq!(refused.state, JobState::Rejected);
    let why = refused.attempts[0].error.clone().unwrap_or_default();
    assert!(why.to_lowercase().contains("docker"), "{why}");

    // The reported labels are not an operator's to set.
    let out = cluster.cli(&["agents", "label", &without.id, "docker=true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reported by the agent"));
    let out = cluster.cli(&["token", "create", "--label", "runtime.runsc=true"]);
    assert!(!out.status.success());
    wait_no_leftovers(&with.id).await;
}

/// An agent killed with SIGKILL leaves its container running; started
/// again, it removes it and reports the attempt failed.
#[tokio::test]
async fn containers_left_by_a_killed_agent_are_removed_at_its_next_start() {
    // A lease far longer than the test: only the agent's report can end
    // the attempt in time.
    let options = ServerOptions {
        extra_args: vec!["--attempt-lease".into(), "60s".into()],
        ..ServerOptions::default()
    };
    let (cluster, mut agent) = cluster_with_agent(Backend::Sqlite, options).await;
    wait_docker(&cluster, &agent.id).await;
    let job = cluster.submit("docker-sleep", &agent.id, &["--param", "seconds=300"]);
    let filter = format!("label=io.drover.job={job}");
    wait_for("the container to run", Duration::from_secs(20), || {
        let id = docker(&["ps", "-q", "--filter", &filter]);
        async move { (!id.trim().is_empty()).then_some(()) }
    })
    .await;
    agent.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !docker(&["ps", "-q", "--filter", &filter]).trim().is_empty(),
        "the container should outlive the killed agent"
    );
    agent.start();
    wait_no_leftovers(&agent.id).await;
    // The restarted agent reports the attempt it stopped.
    let ended = cluster.wait_job(&job, Duration::from_secs(30)).await;
    assert_eq!(ended.state, JobState::Failed, "{ended:?}");
    let error = ended.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("agent restarted"), "{error}");
    assert!(
        agent.log().contains("left behind") || agent.log().contains("leftover"),
        "{}",
        agent.log()
    );
}

/// A process profile's limits hold: CPU time, open files, address space,
/// and an unprivileged user that can still write its working dir.
#[tokio::test]
async fn process_sandbox_limits_hold() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let out = cluster.cli(&["run", "spin", "--target", &agent.id, "--wait"]);
    assert_eq!(out.status.code(), Some(4));
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    let spun = cluster.job(&jobs[0].id);
    let a = &spun.attempts[0];
    assert_eq!(
        a.limit_exceeded,
        Some(drover_proto::sandbox::LimitExceeded::CpuTime),
        "{a:?}"
    );
    assert!(a.duration_ms.unwrap_or(0) < 10_000, "{a:?}");

    let out = cluster.cli(&["run", "limits", "--target", &agent.id, "--follow"]);
    assert!(out.status.success());
    // 256m of address space is 262144 KiB.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "64\n262144\n");

    let out = cluster.cli(&["run", "whoami", "--target", &agent.id, "--follow"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "65534\nok\n");
}

/// Bad sandbox input is refused with a message naming what is wrong, and
/// changes nothing.
#[tokio::test]
async fn bad_sandbox_input_is_refused() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let before: Vec<Value> = cluster.cli_json(&["sandboxes", "list"]);
    let apply = |yaml: &str| {
        let path = cluster.dir.path().join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        cluster.cli(&["actions", "apply", "-f", path.to_str().unwrap()])
    };
    let cases: &[(&str, &[&str])] = &[
        (
            "sandboxes:\n  - {name: x, type: docker, image: i, network: host}\n",
            &["sandbox 'x'", "network"],
        ),
        (
            "sandboxes:\n  - {name: x, type: docker, image: i, memory: 1m}\n",
            &["sandbox 'x'", "memory"],
        ),
        (
            "sandboxes:\n  - {name: x, type: docker, image: i}\n  - {name: y, type: docker, image: i, privileged: true}\n",
            &["bad.yaml: line 3, column 5", "unknown field `privileged`"],
        ),
        (
            "sandboxes:\n  - {name: process, type: process}\n",
            &["built in"],
        ),
        (
            "actions:\n  - {name: z, argv: [/bin/true], sandbox: nowhere}\n",
            &["action 'z'", "unknown sandbox 'nowhere'"],
        ),
        (
            "sandboxes:\n  - {name: x, type: vm}\n",
            &["bad.yaml", "vm"],
        ),
    ];
    for (yaml, wants) in cases {
        let out = apply(yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        for w in *wants {
            assert!(err.contains(w), "{yaml}: {err} (wanted {w})");
        }
    }
    let after: Vec<Value> = cluster.cli_json(&["sandboxes", "list"]);
    assert_eq!(before, after, "a refused catalog changed the profiles");

    // An unknown profile, and a container action run as a process.
    let out = cluster.cli(&[
        "run",
        "echo",
        "--target",
        &agent.id,
        "--param",
        "message=x",
        "--sandbox",
        "nope",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown sandbox 'nope'"));
    let out = cluster.cli(&["run", "hog", "--target", &agent.id, "--sandbox", "process"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot run in process sandbox"), "{err}");
    let jobs: Vec<Job> = cluster.cli_json(&["jobs", "list"]);
    assert!(jobs.is_empty(), "{jobs:?}");

    // In a docker workspace, a task cannot ask for another container.
    let run = json!({
        "definition": "name: w\nworkspace: {target: '*', sandbox: closed}\ntasks:\n  - {id: a, action: hog}\n",
        "source": "w.yaml",
    });
    let resp = cluster
        .http
        .post(format!("{}/api/v1/workflows/runs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&run)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("w.yaml: line 4") && body.contains("workspace's container"),
        "{body}"
    );
    let runs: Vec<Run> = cluster.cli_json(&["workflow", "list"]);
    assert!(runs.is_empty());
}

// ---- workspaces ----

/// A local git repository with a README on `main`, tagged `v1`, then a
/// second commit that changes it.
fn git_repo(dir: &Path) -> String {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(&repo)
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
    std::fs::write(repo.join("README.md"), "hello from v1\n").unwrap();
    git(&["add", "README.md"]);
    git(&["commit", "-q", "-m", "one"]);
    git(&["tag", "v1"]);
    std::fs::write(repo.join("README.md"), "hello from main\n").unwrap();
    git(&["commit", "-q", "-am", "two"]);
    repo.to_str().unwrap().to_owned()
}

/// Posts a definition (as `ws.yaml`); the status and the body.
async fn post_run(cluster: &Cluster, yaml: &str) -> (u16, String) {
    let resp = cluster
        .http
        .post(format!("{}/api/v1/workflows/runs", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .json(&json!({"definition": yaml, "source": "ws.yaml"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn submit_run(cluster: &Cluster, yaml: &str) -> Run {
    let (status, text) = post_run(cluster, yaml).await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn run_of(cluster: &Cluster, id: &str) -> Run {
    cluster.cli_json(&["workflow", "status", id])
}

async fn wait_run_end(cluster: &Cluster, id: &str) -> Run {
    wait_for("the run to end", Duration::from_secs(60), || {
        let r = run_of(cluster, id);
        async move { r.state.is_final().then_some(r) }
    })
    .await
}

/// Waits until the run's workspace is in `state` (or fails on another
/// final state).
async fn wait_workspace(cluster: &Cluster, id: &str, state: WorkspaceState) -> Run {
    wait_for("the workspace state", Duration::from_secs(30), || {
        let r = run_of(cluster, id);
        async move {
            let ws = r.workspace.as_ref().expect("the run has a workspace");
            if ws.state == state {
                return Some(r);
            }
            assert!(
                !ws.state.is_final(),
                "workspace ended {} ({:?}), wanted {}",
                ws.state.as_str(),
                ws.reason,
                state.as_str()
            );
            None
        }
    })
    .await
}

fn workspace_dir(agent: &AgentProc, run: &str) -> std::path::PathBuf {
    agent.state_dir().join("workspaces").join(run)
}

/// A workflow with a workspace checks out a local git repository at a tag;
/// its tasks see the files and each other's; the workspace is removed when
/// the run ends — as a directory and as a docker volume with a long-lived
/// container the tasks run in.
#[tokio::test]
async fn workspace_checkout_is_shared_by_the_tasks_and_removed() {
    for (backend, sandbox) in [
        (Backend::Sqlite, "process"),
        (Backend::Postgres, "process"),
        (Backend::Sqlite, "closed"),
    ] {
        let (cluster, agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        let repo = git_repo(cluster.dir.path());
        let yaml = format!(
            "name: ws\nmode: sequential\nworkspace:\n  target: {}\n  sandbox: {sandbox}\n  git: {{repo: '{repo}', ref: v1}}\n\
             tasks:\n  - {{id: read, action: show, params: {{path: README.md}}}}\n  \
             - {{id: build, action: write, params: {{path: built.txt, content: 'built ${{{{ tasks.read.outputs.line }}}}'}}}}\n  \
             - {{id: pause, action: sleep, params: {{seconds: 2}}}}\n  \
             - {{id: check, action: show, params: {{path: built.txt}}}}\n",
            agent.id
        );
        let run = submit_run(&cluster, &yaml).await;
        if sandbox != "process" {
            // While it runs, the workspace is a volume and a container.
            let label = format!("label=io.drover.workspace={}", run.id);
            wait_for("the workspace container", Duration::from_secs(30), || {
                let c = docker(&["ps", "-q", "--filter", &label]);
                async move { (!c.trim().is_empty()).then_some(()) }
            })
            .await;
            assert!(!docker(&["volume", "ls", "-q", "--filter", &label])
                .trim()
                .is_empty());
        }
        let ended = wait_run_end(&cluster, &run.id).await;
        assert_eq!(
            ended.state,
            RunState::Succeeded,
            "{backend} {sandbox}: {ended:#?}"
        );
        let line = |t: &str| {
            ended
                .tasks
                .iter()
                .find(|x| x.id == t)
                .and_then(|x| x.outputs.get("line").cloned())
        };
        // The tag's content, not main's; the file an earlier task wrote.
        assert_eq!(
            line("read").as_deref(),
            Some("hello from v1"),
            "{backend} {sandbox}"
        );
        assert_eq!(line("check").as_deref(), Some("built hello from v1"));
        let ws = ended.workspace.clone().unwrap();
        assert_eq!(ws.agent_id.as_deref(), Some(agent.id.as_str()));
        assert_eq!(ws.sandbox.as_deref(), Some(sandbox));
        // Every task ran on the workspace's agent.
        for t in &ended.tasks {
            let job = cluster.job(t.job_id.as_deref().unwrap());
            assert_eq!(job.attempts[0].agent_id, agent.id);
        }
        wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;
        assert!(!workspace_dir(&agent, &run.id).exists());
        wait_no_leftovers(&agent.id).await;
    }
}

/// A workspace's variables reach every task that runs in it, rendered
/// from the run's inputs; a name its tasks' actions set too is refused at
/// submit, naming the task, and so is a reserved one.
#[tokio::test]
async fn workspace_variables_reach_its_tasks() {
    for backend in BACKENDS {
        let (cluster, agent) = cluster_with_agent(backend, ServerOptions::default()).await;
        cluster.apply_actions(
            "actions:\n  - name: greet-env\n    argv: [\"/bin/sh\", \"-c\", 'echo \"::set-output greeting=$GREETING\"']\n  \
             - name: own-env\n    argv: [\"/bin/true\"]\n    env: {GREETING: mine}\n",
        );
        let yaml = format!(
            "name: wsenv\nmode: sequential\ninputs:\n  who: {{default: world}}\nworkspace:\n  target: {}\n  \
             env: {{GREETING: 'hello ${{{{ inputs.who }}}}'}}\ntasks:\n  - {{id: a, action: greet-env}}\n  - {{id: b, action: greet-env}}\n",
            agent.id
        );
        let run = submit_run(&cluster, &yaml).await;
        let ended = wait_run_end(&cluster, &run.id).await;
        assert_eq!(ended.state, RunState::Succeeded, "{backend}: {ended:#?}");
        for t in &ended.tasks {
            assert_eq!(
                t.outputs.get("greeting").map(String::as_str),
                Some("hello world"),
                "{backend}: task {}",
                t.id
            );
        }
        wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;

        for (env, want) in [
            (
                "{GREETING: x}",
                "variable 'GREETING' is set both by the workspace and by action 'own-env'",
            ),
            ("{PATH: /tmp}", "'PATH' is reserved"),
            ("{DROVER_X: y}", "'DROVER_X' is reserved"),
            ("{X: '${{ tasks.a.outputs.y }}'}", "env.X refers to tasks.a"),
        ] {
            let yaml = format!(
                "name: bad\nworkspace:\n  target: {}\n  env: {env}\ntasks:\n  - {{id: a, action: own-env}}\n",
                agent.id
            );
            let (status, text) = post_run(&cluster, &yaml).await;
            assert_eq!(status, 422, "{backend} {env}: {text}");
            assert!(text.contains(want), "{backend} {env}: {text}");
            assert!(
                text.contains("ws.yaml"),
                "{backend} {env}: names the file: {text}"
            );
        }
    }
}

/// The workspace goes whatever the ending — cancel, a failed task, a
/// checkout that fails — and stays when `keep_workspace` asks, until
/// `drover workflow cleanup`.
#[tokio::test]
async fn workspaces_are_removed_on_cancel_and_failure_and_kept_on_request() {
    let (cluster, agent) = cluster_with_agent(Backend::Sqlite, ServerOptions::default()).await;
    let repo = git_repo(cluster.dir.path());
    let def = |extra: &str, tasks: &str| {
        format!(
            "name: ws\nmode: sequential\n{extra}workspace:\n  target: {}\n  sandbox: closed\n  git: {{repo: '{repo}'}}\ntasks:\n{tasks}",
            agent.id
        )
    };

    // Cancelled while a task sleeps in the workspace's container.
    let run = submit_run(
        &cluster,
        &def("", "  - {id: nap, action: sleep, params: {seconds: 120}}\n"),
    )
    .await;
    wait_for("the task to run", Duration::from_secs(30), || {
        let r = run_of(&cluster, &run.id);
        async move { (r.tasks[0].state == TaskState::Running).then_some(()) }
    })
    .await;
    let started = Instant::now();
    cluster.cli_ok(&["workflow", "cancel", &run.id]);
    let ended = wait_run_end(&cluster, &run.id).await;
    assert_eq!(ended.state, RunState::Cancelled);
    wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    wait_no_leftovers(&agent.id).await;

    // A failed task fails the run; the workspace still goes.
    let run = submit_run(&cluster, &def("", "  - {id: boom, action: fail}\n")).await;
    assert_eq!(
        wait_run_end(&cluster, &run.id).await.state,
        RunState::Failed
    );
    wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;
    wait_no_leftovers(&agent.id).await;

    // A ref that does not exist: the workspace fails, the task never
    // runs, the run fails saying why, nothing is left.
    let bad = def(
        "",
        "  - {id: read, action: show, params: {path: README.md}}\n",
    )
    .replace(
        &format!("repo: '{repo}'"),
        &format!("repo: '{repo}', ref: no-such-tag"),
    );
    let run = submit_run(&cluster, &bad).await;
    let ended = wait_run_end(&cluster, &run.id).await;
    assert_eq!(ended.state, RunState::Failed);
    let why = ended.reason.clone().unwrap_or_default();
    assert!(
        why.contains("workspace could not be created") && why.contains("no-such-tag"),
        "{why}"
    );
    assert_eq!(ended.tasks[0].state, TaskState::Skipped);
    wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;
    wait_no_leftovers(&agent.id).await;

    // Kept on request, then removed by hand.
    let run = submit_run(
        &cluster,
        &def(
            "keep_workspace: true\n",
            "  - {id: read, action: show, params: {path: README.md}}\n",
        ),
    )
    .await;
    assert_eq!(
        wait_run_end(&cluster, &run.id).await.state,
        RunState::Succeeded
    );
    wait_workspace(&cluster, &run.id, WorkspaceState::Kept).await;
    assert!(workspace_dir(&agent, &run.id).join("README.md").exists());
    assert!(
        !drover_leftovers(&agent.id).is_empty(),
        "the kept container is gone"
    );
    cluster.cli_ok(&["workflow", "cleanup", &run.id]);
    wait_workspace(&cluster, &run.id, WorkspaceState::Removed).await;
    assert!(!workspace_dir(&agent, &run.id).exists());
    wait_no_leftovers(&agent.id).await;
    // Nothing left to clean up.
    let out = cluster.cli(&["workflow", "cleanup", &run.id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no kept workspace"));
}

// ---- capacity and stops ----

fn attempt_signal(cluster: &Cluster, job: &str) -> Option<i32> {
    cluster.job(job).attempts.last().and_then(|a| a.signal)
}

/// The agent reports its capacity; drained, it takes no new work but
/// finishes what runs; stopped, what runs is cancelled (killed at once
/// with --force); resumed, the work that waited runs.
#[tokio::test]
async fn drain_stop_and_resume_an_agent() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    cluster.apply_actions(&CATALOG.replace("IMAGE", "unused"));
    let agent = cluster
        .enroll_agent_with(&[], "allow_actions: [\"*\"]\ncapacity: 3\n")
        .await;
    cluster.wait_online(&agent.id).await;
    let inv = cluster.agent(&agent.id).inventory.unwrap();
    assert_eq!(inv.capacity, 3);

    // Drain: the running job finishes, the new one waits.
    let first = cluster.submit("sleep", &agent.id, &["--param", "seconds=2"]);
    cluster.wait_running(&first).await;
    wait_for("the heartbeat to count it", Duration::from_secs(10), || {
        let inv = cluster.agent(&agent.id).inventory.unwrap();
        async move { (inv.running == 1).then_some(()) }
    })
    .await;
    cluster.cli_ok(&["agents", "drain", &agent.id, "--reason", "kernel update"]);
    let a = cluster.agent(&agent.id);
    assert_eq!(a.dispatch.as_str(), "draining");
    let second = cluster.submit("echo", &agent.id, &["--param", "message=later"]);
    let done = cluster.wait_job(&first, Duration::from_secs(20)).await;
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "drain cancelled running work"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = cluster.job(&second);
    assert_eq!(waiting.state, JobState::Queued);
    let why = waiting.reason.unwrap_or_default();
    assert!(
        why.contains("draining") && why.contains("kernel update"),
        "{why}"
    );
    // A selector leaves a drained agent out.
    let out = cluster.cli(&["run", "echo", "--target", "*", "--param", "message=x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("take no new work"));
    cluster.cli_ok(&["agents", "resume", &agent.id]);
    assert_eq!(
        cluster
            .wait_job(&second, Duration::from_secs(20))
            .await
            .state,
        JobState::Succeeded
    );

    // Graceful stop: SIGTERM ends the sleeper well before its grace.
    let job = cluster.submit("sleep", &agent.id, &["--param", "seconds=300"]);
    cluster.wait_running(&job).await;
    let started = Instant::now();
    let stopped = cluster.cli_ok(&["agents", "stop", &agent.id, "--output", "json"]);
    let stopped: Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(stopped["cancelled"], 1);
    let ended = cluster.wait_job(&job, Duration::from_secs(20)).await;
    assert_eq!(ended.state, JobState::Cancelled);
    assert_eq!(attempt_signal(&cluster, &job), Some(15));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Stopped: new work waits.
    let queued = cluster.submit("echo", &agent.id, &["--param", "message=x"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cluster.job(&queued).state, JobState::Queued);
    assert!(cluster
        .job(&queued)
        .reason
        .unwrap_or_default()
        .contains("stopped"));
    cluster.cli_ok(&["agents", "resume", &agent.id]);
    assert_eq!(
        cluster
            .wait_job(&queued, Duration::from_secs(20))
            .await
            .state,
        JobState::Succeeded
    );

    // Forced stop: a process that ignores SIGTERM dies at once, not after
    // its 20 s grace.
    let job = cluster.submit("stubborn", &agent.id, &[]);
    cluster.wait_running(&job).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    cluster.cli_ok(&["agents", "stop", &agent.id, "--force"]);
    let ended = cluster.wait_job(&job, Duration::from_secs(15)).await;
    assert_eq!(ended.state, JobState::Cancelled);
    assert_eq!(attempt_signal(&cluster, &job), Some(9));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let audit = cluster.cli_ok(&["audit", "list", "--action", "agents"]);
    assert!(
        audit.contains("agent.stop")
            && audit.contains("agent.drain")
            && audit.contains("agent.resume"),
        "{audit}"
    );
}

/// The emergency stop cancels every running attempt on every agent and
/// pauses dispatch everywhere, recorded in the audit log; resume lets the
/// queued work run.
#[tokio::test]
async fn fleet_emergency_stop_and_resume() {
    for backend in BACKENDS {
        let cluster = Cluster::start(backend).await;
        cluster.apply_actions(&CATALOG.replace("IMAGE", "unused"));
        let a = cluster.enroll_agent(&["--group", "fleet"]).await;
        let b = cluster.enroll_agent(&["--group", "fleet"]).await;
        cluster.wait_online(&a.id).await;
        cluster.wait_online(&b.id).await;
        let job = cluster.submit("sleep", "group:fleet", &["--param", "seconds=300"]);
        wait_for("both attempts to run", Duration::from_secs(15), || {
            let j = cluster.job(&job);
            async move {
                j.attempts
                    .iter()
                    .all(|x| x.state == JobState::Running)
                    .then_some(())
            }
        })
        .await;
        let out = cluster.cli_ok(&[
            "fleet",
            "stop",
            "--reason",
            "bad deploy",
            "--output",
            "json",
        ]);
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["cancelled"], 2, "{backend}: {out}");
        assert_eq!(out["agents"], 2);
        assert_eq!(out["fleet"]["stopped"], true);
        let ended = cluster.wait_job(&job, Duration::from_secs(20)).await;
        assert_eq!(ended.state, JobState::Cancelled, "{backend}");
        assert!(ended.attempts.iter().all(|x| x.signal == Some(15)));

        let queued = cluster.submit("echo", "group:fleet", &["--param", "message=x"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let waiting = cluster.job(&queued);
        assert_eq!(waiting.state, JobState::Queued, "{backend}");
        let why = waiting.reason.unwrap_or_default();
        assert!(
            why.contains("paused fleet-wide") && why.contains("bad deploy"),
            "{why}"
        );
        let status = cluster.cli_ok(&["fleet", "status"]);
        assert!(status.contains("STOPPED"), "{status}");
        let metrics = cluster.metrics().await;
        assert!(metrics.contains("drover_fleet_stopped 1"), "{metrics}");

        cluster.cli_ok(&["fleet", "resume"]);
        assert_eq!(
            cluster
                .wait_job(&queued, Duration::from_secs(20))
                .await
                .state,
            JobState::Succeeded,
            "{backend}"
        );
        let audit = cluster.cli_ok(&["audit", "list", "--action", "fleet"]);
        assert!(audit.contains("fleet.stop"), "{audit}");
        assert!(audit.contains("fleet.resume"), "{audit}");
    }
}

/// The example catalog applies, and the workspace example checks out the
/// repository given as an input and runs as the README says.
#[tokio::test]
async fn the_examples_apply_and_the_workspace_example_runs() {
    let cluster = Cluster::start(Backend::Sqlite).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let catalog = root.join("examples/actions.yaml");
    let applied = cluster.cli_ok(&["actions", "apply", "-f", catalog.to_str().unwrap()]);
    assert!(applied.contains("created\tsandbox container"), "{applied}");
    let listed = cluster.cli_ok(&["sandboxes", "list"]);
    assert!(
        listed.contains("memory=64m") && listed.contains("cpu_time=30s"),
        "{listed}"
    );
    let agent = cluster
        .enroll_agent_with(&["--group", "local"], &cloning_here(&cluster))
        .await;
    cluster.wait_online(&agent.id).await;
    let repo = git_repo(cluster.dir.path());
    let example = root.join("examples/workspace.yaml");
    let out = cluster.cli(&[
        "workflow",
        "submit",
        "-f",
        example.to_str().unwrap(),
        "--input",
        &format!("repo={repo}"),
        "--input",
        "ref=v1",
        "--follow",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[readme] hello from v1"), "{text}");
    assert!(
        text.contains("workspace") && text.contains("creating"),
        "{text}"
    );
    assert!(
        text.contains(&format!("checked out v1 of {repo}")),
        "{text}"
    );
    let runs: Vec<Run> = cluster.cli_json(&["workflow", "list"]);
    let run = wait_workspace(&cluster, &runs[0].id, WorkspaceState::Removed).await;
    assert!(!workspace_dir(&agent, &run.id).exists());
    // The artifact was collected from the workspace.
    let artifacts = cluster.cli_ok(&["workflow", "artifacts", &run.id]);
    assert!(artifacts.contains("summary.txt"), "{artifacts}");
}
