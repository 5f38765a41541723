//! Docker sandboxes against the real engine and the test image
//! (`DROVER_TEST_IMAGE`, built by `scripts/test`): limits, isolation,
//! stops, outputs, refusals, and the clean-up of leftovers. A test panics
//! with the reason when the image is not named or the engine is away.
//!
//! Each test has an agent id of its own, and a guard removes whatever
//! carries it (even when the test fails), so tests run side by side on one
//! engine, like agents do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use drover_proto::jobs::{Assignment, Outcome};
use drover_proto::sandbox::{LimitExceeded, Sandbox};

use crate::config::{DockerHost, SandboxKind, DEFAULT_DOCKER_HOST};
use crate::docker::api::{Client, Endpoint};
use crate::docker::container::{container_config, ContainerSpec};
use crate::docker::{Engine, LABEL_AGENT, LABEL_KIND, LABEL_MANAGED};
use crate::executor::{set_mode, ExecOptions, Stop};
use crate::test_support::{assignment, rt, run_stopped_after_output, run_with, Run};

/// The image the tests run.
pub(crate) fn test_image() -> String {
    std::env::var("DROVER_TEST_IMAGE").unwrap_or_else(|_| {
        panic!(
            "DROVER_TEST_IMAGE is not set: the docker tests need the test image; run scripts/test, \
             or build it with scripts/test and export DROVER_TEST_IMAGE=drover-test/busybox:2"
        )
    })
}

fn default_host() -> DockerHost {
    DockerHost::parse(DEFAULT_DOCKER_HOST).unwrap()
}

/// A client of its own for the test's checks and clean-up.
pub(crate) async fn client() -> Client {
    let path = DEFAULT_DOCKER_HOST.trim_start_matches("unix://");
    Client::connect(Endpoint::Unix(path.into()), DEFAULT_DOCKER_HOST.to_owned())
        .await
        .unwrap_or_else(|e| panic!("the docker tests need the Docker engine: {e}"))
}

/// One test's agent: its id, state dir, engine and options.
pub(crate) struct Env {
    pub agent_id: String,
    pub image: String,
    pub engine: Arc<Engine>,
    pub opts: ExecOptions,
    _tmp: tempfile::TempDir,
}

impl Env {
    pub(crate) async fn new(name: &str) -> Env {
        let image = test_image();
        let agent_id = format!("test-{name}-{:08x}", fastrand::u32(..));
        let tmp = tempfile::tempdir().unwrap();
        set_mode(tmp.path(), 0o711).unwrap();
        let engine = Arc::new(Engine::new(default_host(), &agent_id));
        let status = engine.status().await;
        assert!(
            status.available,
            "the Docker engine is unreachable, and the docker tests need it: {}",
            status.error.unwrap_or_default()
        );
        let opts = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Process, SandboxKind::Docker],
            docker: Some(engine.clone()),
            ..ExecOptions::new(tmp.path())
        };
        opts.prepare().unwrap();
        Env {
            agent_id,
            image,
            engine,
            opts,
            _tmp: tmp,
        }
    }

    /// A docker profile of the test image (never pulled) with `extra`.
    pub(crate) fn sandbox(&self, extra: serde_json::Value) -> Sandbox {
        let mut v = serde_json::json!({
            "type": "docker", "name": "test", "image": self.image, "pull": "never",
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let s: Sandbox = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s
    }

    pub(crate) fn attempt(&self, argv: &[&str], extra: serde_json::Value) -> Assignment {
        let mut a = assignment(argv);
        a.sandbox = Some(self.sandbox(extra));
        a
    }

    pub(crate) async fn run(&self, a: &Assignment) -> Run {
        run_with(&self.opts, a, &Stop::new()).await
    }

    /// Containers and volumes labelled with this agent's id.
    pub(crate) async fn labelled(&self) -> (Vec<String>, Vec<String>) {
        labelled(&client().await, &self.agent_id).await
    }

    /// Fails the test if anything of this agent is left in the engine.
    pub(crate) async fn assert_clean(&self) {
        let (containers, volumes) = self.labelled().await;
        assert!(
            containers.is_empty() && volumes.is_empty(),
            "left in the engine: containers {containers:?}, volumes {volumes:?}"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A thread of its own: this may run inside a runtime.
        let id = self.agent_id.clone();
        let _ = std::thread::spawn(move || rt().block_on(remove_labelled(&id))).join();
    }
}

async fn labelled(client: &Client, agent_id: &str) -> (Vec<String>, Vec<String>) {
    let labels = [format!("{LABEL_AGENT}={agent_id}")];
    let containers = client
        .list_containers(&labels)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|c| c.names)
        .collect();
    let volumes = client.list_volumes(&labels).await.unwrap();
    (containers, volumes)
}

async fn remove_labelled(agent_id: &str) {
    let client = client().await;
    let (containers, volumes) = labelled(&client, agent_id).await;
    for name in containers {
        let _ = client.remove_container(name.trim_start_matches('/')).await;
    }
    for name in volumes {
        let _ = client.remove_volume(&name).await;
    }
}

#[test]
fn argv_and_environment_are_passed_literally() {
    rt().block_on(async {
        let env = Env::new("argv").await;
        let mut a = env.attempt(
            &[
                "sh",
                "-c",
                "printf '[%s]\\n' \"$1\"; env | sort",
                "sh",
                "hi; rm -rf /",
            ],
            serde_json::json!({}),
        );
        a.env.insert("GREETING".into(), "hello world".into());
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert!(r.stdout.starts_with("[hi; rm -rf /]\n"), "{}", r.stdout);
        assert!(r.stdout.contains("GREETING=hello world\n"), "{}", r.stdout);
        assert!(r.stdout.contains("DROVER_OUTPUT=/drover/outputs.json\n"));
        // The image's PATH, not the agent's.
        assert!(r.stdout.contains("PATH=/bin\n"), "{}", r.stdout);
        assert!(r.stdout.contains("PWD=/work\n"), "{}", r.stdout);
        // An argv element is never shell input.
        let a = env.attempt(&["echo", "hi; rm -rf /"], serde_json::json!({}));
        let r = env.run(&a).await;
        assert_eq!(r.stdout, "hi; rm -rf /\n");
        env.assert_clean().await;
    });
}

#[test]
fn memory_hog_is_oom_killed_and_reported() {
    rt().block_on(async {
        let env = Env::new("oom").await;
        let a = env.attempt(&["tail", "/dev/zero"], serde_json::json!({"memory": "64m"}));
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(r.result.limit_exceeded, Some(LimitExceeded::Memory));
        assert_eq!(
            r.result.error.as_deref(),
            Some("killed: exceeded its memory limit of 64m")
        );
        assert_eq!(r.result.signal, Some(libc::SIGKILL));
        env.assert_clean().await;
    });
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    rt().block_on(async {
        let env = Env::new("pids").await;
        let a = env.attempt(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 40 ]; do sleep 2 & i=$((i+1)); done; wait; echo survived",
            ],
            serde_json::json!({"pids": 8}),
        );
        let r = env.run(&a).await;
        assert!(r.stderr.contains("can't fork"), "{r:?}");
        assert!(r.elapsed < Duration::from_secs(8), "{:?}", r.elapsed);
        env.assert_clean().await;
    });
}

/// The docker0 gateway address, from the engine's bridge network.
async fn bridge_gateway() -> std::net::Ipv4Addr {
    let (gateway, subnet) = client().await.network_ipam("bridge").await.unwrap();
    if let Some(gw) = gateway.filter(|g| !g.is_empty()) {
        return gw.parse().unwrap();
    }
    // Without a gateway the engine takes the subnet's first address.
    let subnet = subnet.unwrap_or_else(|| panic!("the bridge network has no subnet"));
    let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    std::net::Ipv4Addr::from(u32::from(base) + 1)
}

#[test]
fn no_network_by_default_and_bridge_when_asked() {
    rt().block_on(async {
        let env = Env::new("net").await;
        let gateway = bridge_gateway().await;
        let listener = tokio::net::TcpListener::bind((gateway, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let gw = gateway.to_string();

        let a = env.attempt(&["nc", "-w", "3", &gw, &port], serde_json::json!({}));
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        assert!(r.stderr.contains("Network is unreachable"), "{r:?}");

        let a = env.attempt(
            &["sh", "-c", "echo hello | nc -w 3 \"$0\" \"$1\"", &gw, &port],
            serde_json::json!({"network": "bridge"}),
        );
        let (r, got) = tokio::join!(env.run(&a), async {
            let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
                .await
                .expect("a connection from the bridge container")
                .unwrap();
            let mut buf = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut buf)
                .await
                .unwrap();
            buf
        });
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(got, "hello\n");
        env.assert_clean().await;
    });
}

#[test]
fn read_only_root_no_capabilities_no_new_privileges() {
    rt().block_on(async {
        let env = Env::new("ro").await;
        let a = env.attempt(
            &[
                "sh",
                "-c",
                "touch /x 2>/dev/null && echo root-writable; \
                 touch /tmp/y && echo tmp-ok; touch /work/z && echo work-ok; \
                 grep -E '^(CapEff|NoNewPrivs)' /proc/self/status",
            ],
            serde_json::json!({}),
        );
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(
            r.stdout,
            "tmp-ok\nwork-ok\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n"
        );
        env.assert_clean().await;
    });
}

#[test]
fn timeout_kills_a_term_ignoring_container_after_the_grace() {
    rt().block_on(async {
        let env = Env::new("timeout").await;
        // The timeout counts from the attempt's start, container start
        // included: leave the engine room to start it.
        let mut a = env.attempt(
            &["sh", "-c", "trap '' TERM; echo up; sleep 100; sleep 100"],
            serde_json::json!({}),
        );
        a.timeout_ms = 4_000;
        a.kill_grace_ms = 1_500;
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::TimedOut, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGKILL), "{r:?}");
        assert_eq!(r.stdout, "up\n");
        assert!(r.elapsed >= Duration::from_millis(5_500), "{:?}", r.elapsed);
        assert!(r.elapsed < Duration::from_secs(15), "{:?}", r.elapsed);
        env.assert_clean().await;
    });
}

#[test]
fn cancel_terminates_and_a_forced_stop_skips_the_grace() {
    rt().block_on(async {
        let env = Env::new("stop").await;
        // A graceful cancel: SIGTERM reaches the program through the init.
        let a = env.attempt(
            &["sh", "-c", "echo up; exec sleep 100"],
            serde_json::json!({}),
        );
        let r =
            run_stopped_after_output(&env.opts, &a, &[(Duration::from_millis(200), false)]).await;
        assert_eq!(r.result.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGTERM), "{r:?}");
        assert_eq!(r.result.error.as_deref(), Some("cancelled"));
        assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);

        // A forced stop during a long grace kills at once.
        let mut a = env.attempt(
            &["sh", "-c", "trap '' TERM; echo up; sleep 100; sleep 100"],
            serde_json::json!({}),
        );
        a.kill_grace_ms = 60_000;
        let r = run_stopped_after_output(
            &env.opts,
            &a,
            &[
                (Duration::from_millis(200), false),
                (Duration::from_millis(700), true),
            ],
        )
        .await;
        assert_eq!(r.result.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.result.signal, Some(libc::SIGKILL), "{r:?}");
        assert_eq!(
            r.result.error.as_deref(),
            Some("cancelled: killed at once (forced stop)")
        );
        assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
        env.assert_clean().await;
    });
}

#[test]
fn outputs_come_from_a_container() {
    rt().block_on(async {
        let env = Env::new("outputs").await;
        let a = env.attempt(
            &[
                "sh",
                "-c",
                "echo '::set-output name=a=1'; printf '{\"b\": \"two\", \"n\": 3}' > \"$DROVER_OUTPUT\"",
            ],
            serde_json::json!({"user": "65534:65534"}),
        );
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Succeeded, "{r:?}");
        let outputs: Vec<(&str, &str)> = r
            .result
            .outputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(outputs, vec![("a", "1"), ("b", "two"), ("n", "3")]);
        env.assert_clean().await;
    });
}

#[test]
fn refusals_and_failures_before_anything_runs() {
    rt().block_on(async {
        let env = Env::new("refuse").await;
        // A runtime the engine does not have: never a weaker one.
        let a = env.attempt(&["true"], serde_json::json!({"runtime": "runsc"}));
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Rejected, "{r:?}");
        let err = r.result.error.unwrap();
        assert!(
            err.starts_with("runtime 'runsc' is not available on this agent (the engine offers: ")
                && err.contains("runc"),
            "{err}"
        );
        // An image that is absent and may not be pulled.
        let missing = format!("drover-test/absent:{}", fastrand::u32(..));
        let mut a = env.attempt(&["true"], serde_json::json!({}));
        if let Some(Sandbox::Docker(d)) = &mut a.sandbox {
            d.image = missing.clone();
        }
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        let err = r.result.error.unwrap();
        assert!(
            err.starts_with(&format!(
                "image '{missing}' is not present on this agent's Docker engine and the sandbox's pull policy is never; load it into this engine (`docker load -i FILE` or `docker import`)"
            )),
            "{err}"
        );
        // A pull that fails names the image and the engine's error.
        let unreachable = "127.0.0.1:9/drover-absent:1";
        let mut a = env.attempt(&["true"], serde_json::json!({"pull": "missing"}));
        if let Some(Sandbox::Docker(d)) = &mut a.sandbox {
            d.image = unreachable.to_owned();
        }
        let r = env.run(&a).await;
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        let err = r.result.error.unwrap();
        assert!(
            err.starts_with(&format!(
                "image '{unreachable}' is not present on this agent's Docker engine and could not be pulled ("
            )) && err.contains("`docker load -i FILE`")
                && err.len() > 250,
            "{err}"
        );
        assert!(r.stderr.contains("[drover] pulling image"), "{}", r.stderr);
        env.assert_clean().await;
    });
}

#[test]
fn an_unreachable_engine_fails_the_attempt_and_the_status_says_why() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::new(
            DockerHost::Unix("/nonexistent/docker.sock".into()),
            "test-unreachable",
        ));
        let status = engine.status().await;
        assert!(!status.available);
        let error = status.error.unwrap();
        assert!(error.contains("unix:///nonexistent/docker.sock"), "{error}");
        let opts = ExecOptions {
            allow_sandboxes: vec![SandboxKind::Docker],
            docker: Some(engine),
            ..ExecOptions::new(tmp.path())
        };
        let mut a = assignment(&["true"]);
        a.sandbox = Some(
            serde_json::from_value(
                serde_json::json!({"type": "docker", "name": "d", "image": "busybox"}),
            )
            .unwrap(),
        );
        let r = run_with(&opts, &a, &Stop::new()).await;
        // Failed, not rejected: the server may retry it.
        assert_eq!(r.result.outcome, Outcome::Failed, "{r:?}");
        let err = r.result.error.unwrap();
        assert!(
            err.starts_with("the Docker engine at unix:///nonexistent/docker.sock is unreachable"),
            "{err}"
        );
    });
}

#[test]
fn status_reports_what_the_engine_offers() {
    rt().block_on(async {
        let env = Env::new("status").await;
        let status = env.engine.status().await;
        assert!(status.available, "{status:?}");
        assert!(status.version.as_deref().is_some_and(|v| !v.is_empty()));
        assert!(status.api_version.is_some());
        assert!(status.runtimes.contains(&"runc".to_owned()), "{status:?}");
        assert!(
            status.engine_runtimes.contains(&"runc".to_owned()),
            "{status:?}"
        );
        assert!(status.default_runtime.is_some());
        assert!(
            matches!(status.cgroup_version.as_deref(), Some("1" | "2")),
            "{status:?}"
        );
        assert_eq!(status.error, None);
        // Cached within the interval.
        assert_eq!(
            env.engine.status_at_most(Duration::from_secs(30)).await,
            status
        );
    });
}

/// Creates and starts a `sleep` container of `env`'s image with `labels`;
/// its name.
async fn make_container(client: &Client, env: &Env, labels: &[(&str, &str)]) -> String {
    let name = format!("drover-test-leftover-{:08x}", fastrand::u32(..));
    let Sandbox::Docker(sandbox) = env.sandbox(serde_json::json!({})) else {
        unreachable!()
    };
    let config = container_config(ContainerSpec {
        sandbox: &sandbox,
        runtime: None,
        entrypoint: vec!["sleep".into(), "100".into()],
        cmd: vec![],
        env: vec![],
        working_dir: "/",
        mounts: vec![],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        log_max_bytes: 1 << 20,
    });
    client.create_container(&name, &config).await.unwrap();
    client.start_container(&name).await.unwrap();
    name
}

#[test]
fn startup_cleanup_removes_only_this_agents_attempt_containers() {
    rt().block_on(async {
        let env = Env::new("cleanup").await;
        let other = Env::new("cleanup-other").await;
        let client = client().await;
        let mine = make_container(
            &client,
            &env,
            &[
                (LABEL_MANAGED, "true"),
                (LABEL_AGENT, &env.agent_id),
                (LABEL_KIND, "attempt"),
            ],
        )
        .await;
        let my_workspace = make_container(
            &client,
            &env,
            &[
                (LABEL_MANAGED, "true"),
                (LABEL_AGENT, &env.agent_id),
                (LABEL_KIND, "workspace"),
            ],
        )
        .await;
        let theirs = make_container(
            &client,
            &env,
            &[
                (LABEL_MANAGED, "true"),
                (LABEL_AGENT, &other.agent_id),
                (LABEL_KIND, "attempt"),
            ],
        )
        .await;
        assert_eq!(env.engine.remove_leftover_attempts().await.unwrap(), 1);
        let (left, _) = env.labelled().await;
        assert_eq!(left, vec![format!("/{my_workspace}")]);
        assert!(!left.contains(&format!("/{mine}")));
        let (theirs_left, _) = other.labelled().await;
        assert_eq!(theirs_left, vec![format!("/{theirs}")]);
        // The guards remove the rest.
    });
}

#[test]
fn an_engine_over_tcp_is_reached_too() {
    rt().block_on(async {
        // The engine's socket, offered on a loopback TCP port.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = DEFAULT_DOCKER_HOST.trim_start_matches("unix://").to_owned();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                });
            }
        });
        let host = DockerHost::parse(&format!("tcp://{addr}")).unwrap();
        let engine = Engine::new(host, "test-tcp");
        let status = engine.status().await;
        assert!(status.available, "{status:?}");
        assert!(status.runtimes.contains(&"runc".to_owned()), "{status:?}");
    });
}
