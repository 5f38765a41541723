//! The harness every integration test uses: it starts the real `drover` and
//! `drover-agent` binaries on loopback ports with temp dirs, on SQLite or
//! PostgreSQL, and reads like the spec:
//!
//! ```ignore
//! let mut cluster = Cluster::start(Backend::Sqlite).await;
//! let agent = cluster.enroll_agent(&[]).await;
//! cluster.wait_online(&agent.id).await;
//! ```
//!
//! Binaries are taken from the target dir this test binary was built into;
//! `scripts/test` builds them first. Every process is killed on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use drover_proto::api::{Agent, AgentStatus};
pub use drover_proto::jobs::{Job, JobState};
pub use drover_store::testing::{TestDb, BACKENDS};
pub use drover_store::Backend;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The admin password every test cluster is started with.
pub const ADMIN_PASSWORD: &str = "test-admin-password";

/// POSTs `body` as JSON (with a bearer token if given); returns the status
/// and the JSON answer (null when it is not JSON).
pub async fn post_json(
    http: &reqwest::Client,
    url: String,
    bearer: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = http.post(url).json(&body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Path of a workspace binary next to this test binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/foundation-xxxx -> target/debug/NAME
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins), as scripts/test does",
        path.display()
    );
    path
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port of this address nobody listens on right now.
pub fn free_port_on(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// The Docker test image (`DROVER_TEST_IMAGE`, built by `scripts/test`).
/// Fails loudly when it is not set, the engine is not reachable or the
/// image is missing: a sandbox test never passes without Docker.
pub fn docker_image() -> String {
    let image = std::env::var("DROVER_TEST_IMAGE").unwrap_or_else(|_| {
        panic!("DROVER_TEST_IMAGE is not set: run the tests through ./scripts/test, which builds the Docker test image")
    });
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &image])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the docker CLI ({e}): the sandbox tests need Docker")
        });
    assert!(
        out.status.success(),
        "the Docker engine does not have {image} (or is not reachable): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// Runs the docker CLI and returns its stdout; fails loudly.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The address of the host on Docker's default bridge network (its
/// gateway), which containers on that network can reach. Engines do not
/// always record the gateway, so the bridge interface is asked too.
pub fn docker_gateway() -> String {
    let recorded = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ]);
    if !recorded.trim().is_empty() {
        return recorded.trim().to_owned();
    }
    let name = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{index .Options \"com.docker.network.bridge.name\"}}",
    ]);
    let name = match name.trim() {
        "" | "<no value>" => "docker0".to_owned(),
        n => n.to_owned(),
    };
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", &name])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip to read {name}'s address: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the bridge {name} has no IPv4 address: {text}"))
}

/// Containers (any state) and volumes Drover made for this agent.
pub fn drover_leftovers(agent_id: &str) -> Vec<String> {
    let filter = format!("label=io.drover.agent={agent_id}");
    let mut left: Vec<String> = docker(&["ps", "-aq", "--filter", &filter])
        .lines()
        .map(|l| format!("container {l}"))
        .collect();
    left.extend(
        docker(&["volume", "ls", "-q", "--filter", &filter])
            .lines()
            .map(|l| format!("volume {l}")),
    );
    left
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(child: &Child, sig: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on a pid we own; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Sets the open-file limit (soft and hard) of the process `cmd` starts.
fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: setrlimit(2) is async-signal-safe and touches no memory of
    // the parent; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Raises this process's soft open-file limit to its hard limit (a test
/// that opens many sockets).
pub fn raise_own_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit(2) on structs we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// Waits for a child to exit, up to `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    wait_for("process exit", timeout, || {
        let status = child.try_wait().expect("try_wait");
        async move { status }
    })
    .await
}

/// Fails unless `promtool check metrics` accepts the text.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (scripts/test installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A second server process on a cluster's database; killed on drop.
pub struct Replica {
    pub url: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for the server of a test cluster.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub heartbeat_interval: &'static str,
    pub agent_access_ttl: Option<&'static str>,
    pub extra_args: Vec<String>,
    /// Variables set for the server process.
    pub extra_env: Vec<(String, String)>,
    /// The address to listen on instead of 127.0.0.1, e.g. the Docker
    /// bridge's gateway, so that containers could reach the server.
    pub listen_ip: Option<String>,
    /// The server's database instead of the test database (e.g. a SQLite
    /// file on a small tmpfs).
    pub database_url: Option<String>,
    /// The server's open-file limit (soft and hard), to see what it does
    /// when file descriptors run short.
    pub open_files: Option<u64>,
    /// Serve HTTPS with these files (`TestPki::files`); the cluster's
    /// client and CLI trust its CA.
    pub tls: Option<TlsFiles>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            heartbeat_interval: "1s",
            agent_access_ttl: None,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            listen_ip: None,
            database_url: None,
            open_files: None,
            tls: None,
        }
    }
}

/// A server process (restartable on the same port and data) and a logged-in
/// admin for the CLI.
pub struct Cluster {
    pub backend: Backend,
    _db: TestDb,
    database_url: String,
    /// Holds the server's data dir and the CLI's HOME.
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    options: ServerOptions,
    server: Option<Child>,
    starts: u32,
    /// A session token of the admin, for the CLI and API calls.
    pub admin_token: String,
    pub http: reqwest::Client,
}

impl Cluster {
    pub async fn start(backend: Backend) -> Cluster {
        Cluster::start_with(backend, ServerOptions::default()).await
    }

    pub async fn start_with(backend: Backend, options: ServerOptions) -> Cluster {
        let db = TestDb::new(backend).await;
        let ip = options
            .listen_ip
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let port = free_port_on(&ip);
        let (scheme, http) = match &options.tls {
            Some(tls) => ("https", tls.client()),
            None => ("http", reqwest::Client::new()),
        };
        let mut cluster = Cluster {
            backend,
            database_url: options
                .database_url
                .clone()
                .unwrap_or_else(|| db.url.clone()),
            _db: db,
            dir: tempfile::tempdir().expect("temp dir"),
            port,
            url: format!("{scheme}://{ip}:{port}"),
            options,
            server: None,
            starts: 0,
            admin_token: String::new(),
            http,
        };
        cluster.start_server().await;
        cluster.admin_token = cluster.login(ADMIN_PASSWORD).await.expect("admin login");
        cluster
    }

    /// Runs one statement on the server's database behind its back.
    pub async fn tamper(&self, sql: &str) -> u64 {
        drover_store::testing::tamper(&self.database_url, sql).await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's database URL (for tests that open or alter it directly).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Path of the log of the n-th server start (1-based).
    pub fn server_log(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("server-{start}.log"))
    }

    /// Starts the server process and waits until it is ready.
    pub async fn start_server(&mut self) {
        assert!(self.server.is_none(), "server already running");
        self.starts += 1;
        let log = File::create(self.server_log(self.starts)).expect("server log");
        let mut cmd = Command::new(bin("drover"));
        let ip = self
            .options
            .listen_ip
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        cmd.arg("server")
            .args(["--listen", &format!("{ip}:{}", self.port)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--database-url", &self.database_url])
            .args(["--heartbeat-interval", self.options.heartbeat_interval])
            .args(["--log-format", "json"]);
        if let Some(ttl) = self.options.agent_access_ttl {
            cmd.args(["--agent-access-ttl", ttl]);
        }
        if let Some(tls) = &self.options.tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        cmd.args(&self.options.extra_args)
            .envs(self.options.extra_env.iter().map(|(k, v)| (k, v)))
            .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("DROVER_CONFIG")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(n) = self.options.open_files {
            limit_open_files(&mut cmd, n);
        }
        self.server = Some(cmd.spawn().expect("spawn drover server"));
        let url = format!("{}/readyz", self.url);
        let http = self.http.clone();
        let log_path = self.server_log(self.starts);
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "server exited with {status} at start:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("server not ready after 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts another `drover server` on the same database and data dir
    /// (so the same signing key): a replica, on a port of its own.
    pub async fn start_replica(&self) -> Replica {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log_path = self.dir.path().join(format!("replica-{port}.log"));
        let log = File::create(&log_path).expect("replica log");
        let mut child = Command::new(bin("drover"))
            .arg("server")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--database-url", &self.database_url])
            .args(["--heartbeat-interval", self.options.heartbeat_interval])
            .args(["--log-format", "json"])
            .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("HOME", self.dir.path())
            .env_remove("DROVER_CONFIG")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn replica");
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "replica exited with {status} at start:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica not ready after 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Replica { url, child }
    }

    /// The pid of the running server process.
    pub fn server_pid(&self) -> u32 {
        self.server.as_ref().expect("server running").id()
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop_server(&mut self) -> ExitStatus {
        let mut child = self.server.take().expect("server running");
        signal(&child, libc::SIGTERM);
        wait_exit(&mut child, Duration::from_secs(15)).await
    }

    /// SIGKILL: the server gets no chance to clean up.
    pub async fn kill_server(&mut self) {
        let mut child = self.server.take().expect("server running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Logs in through the API; returns the session token.
    pub async fn login(&self, password: &str) -> Result<String, String> {
        let resp = self
            .http
            .post(format!("{}/api/v1/auth/login", self.url))
            .json(&serde_json::json!({"username": "admin", "password": password}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(body.to_string());
        }
        Ok(body["token"].as_str().expect("token").to_owned())
    }

    /// A `drover` CLI command against this cluster, as the admin.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("drover"));
        cmd.args(args)
            .env("DROVER_SERVER", &self.url)
            .env("DROVER_TOKEN", &self.admin_token)
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .stdin(Stdio::null());
        if let Some(tls) = &self.options.tls {
            cmd.env("DROVER_CA_FILE", &tls.ca);
        }
        cmd
    }

    /// Adds a user with `drover users add NAME --role ROLE --password-stdin
    /// EXTRA…`; returns the password (NAME-password-long).
    pub fn add_user(&self, name: &str, role: &str, extra: &[&str]) -> String {
        use std::io::Write as _;
        let password = format!("{name}-password-long");
        let mut args = vec!["users", "add", name, "--role", role, "--password-stdin"];
        args.extend(extra);
        let mut child = self
            .cli_command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start drover users add");
        writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write the password");
        let out = child.wait_with_output().expect("drover users add");
        assert!(
            out.status.success(),
            "users add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        password
    }

    /// Runs the CLI and returns its output, whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run drover")
    }

    /// Runs the CLI, requires success, and returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs the CLI with `--output json` and parses stdout.
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let text = self.cli_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("drover {all:?}: {e}: {text}"))
    }

    /// A new one-time bootstrap token; `extra` are flags of `token create`.
    pub fn bootstrap_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend(extra);
        self.cli_ok(&args).trim().to_owned()
    }

    /// Applies an action catalog given as YAML text.
    pub fn apply_actions(&self, yaml: &str) {
        let path = self
            .dir
            .path()
            .join(format!("actions-{}.yaml", free_port()));
        std::fs::write(&path, yaml).expect("write catalog");
        self.cli_ok(&["actions", "apply", "-f", path.to_str().expect("utf-8 path")]);
    }

    /// Submits a job and returns its id.
    pub fn submit(&self, action: &str, target: &str, extra: &[&str]) -> String {
        let mut args = vec!["run", action, "--target", target];
        args.extend(extra);
        self.cli_ok(&args).trim().to_owned()
    }

    /// Waits until the job is final and returns it.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Job {
        wait_for("job to end", timeout, || {
            let job: Job = self.cli_json(&["jobs", "show", id]);
            async move { job.state.is_final().then_some(job) }
        })
        .await
    }

    /// Waits (10 s at most) until the job is running.
    pub async fn wait_running(&self, id: &str) {
        wait_for("the job to run", Duration::from_secs(10), || {
            let job = self.job(id);
            async move { (job.state == JobState::Running).then_some(()) }
        })
        .await
    }

    pub fn job(&self, id: &str) -> Job {
        self.cli_json(&["jobs", "show", id])
    }

    /// The server's `/metrics` in the classic text format.
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("GET /metrics");
        resp.text().await.expect("metrics body")
    }

    pub fn agents(&self) -> Vec<Agent> {
        self.cli_json(&["agents", "list"])
    }

    pub fn agent(&self, id: &str) -> Agent {
        self.cli_json(&["agents", "show", id])
    }

    /// Enrolls and starts a new agent with a fresh token.
    pub async fn enroll_agent(&self, token_flags: &[&str]) -> AgentProc {
        self.enroll_agent_with(token_flags, DEFAULT_AGENT_YAML)
            .await
    }

    /// Enrolls and starts a new agent with this agent.yaml.
    pub async fn enroll_agent_with(&self, token_flags: &[&str], yaml: &str) -> AgentProc {
        let mut agent = AgentProc::with_config(&self.url, yaml);
        self.enroll_and_start(&mut agent, token_flags);
        agent
    }

    /// Enrolls a prepared agent (its own server URL — a proxy, say —, its
    /// own state dir) with a fresh token and starts it.
    pub fn enroll_and_start(&self, agent: &mut AgentProc, token_flags: &[&str]) {
        let token = self.bootstrap_token(token_flags);
        let out = agent
            .command(&["enroll", "--token", &token])
            .output()
            .expect("enroll");
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent.id = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned();
        agent.start();
    }

    /// An agent that reaches the server through `server_url` (a proxy, a
    /// gate), enrolled, started and online.
    pub async fn agent_via(&self, server_url: &str) -> AgentProc {
        let mut agent = AgentProc::new(server_url);
        self.enroll_and_start(&mut agent, &[]);
        self.wait_online(&agent.id).await;
        agent
    }

    /// Enrolls an agent over HTTP, as an agent would; returns the answer
    /// (`agent_id`, `credentials`).
    pub async fn enroll_over_http(&self) -> Value {
        let token = self.bootstrap_token(&[]);
        let (code, enrolled) = post_json(
            &self.http,
            format!("{}/api/v1/agent/enroll", self.url),
            None,
            serde_json::json!({"token": token, "hostname": "h", "agent_version": "0.1.0"}),
        )
        .await;
        assert_eq!(code, 200, "{enrolled}");
        enrolled
    }

    /// Waits until the agent is listed online with an inventory.
    pub async fn wait_online(&self, id: &str) -> Agent {
        wait_for("agent online", Duration::from_secs(20), || {
            let a = self.agent(id);
            async move { (a.status == AgentStatus::Online && a.inventory.is_some()).then_some(a) }
        })
        .await
    }

    /// Waits until the agent has been seen after `after`.
    pub async fn wait_seen_after(&self, id: &str, after: chrono::DateTime<chrono::Utc>) -> Agent {
        wait_for("a heartbeat", Duration::from_secs(20), || {
            let a = self.agent(id);
            async move { a.last_seen_at.is_some_and(|t| t > after).then_some(a) }
        })
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent.yaml of test agents: every action allowed, 4 slots.
pub const DEFAULT_AGENT_YAML: &str = "allow_actions: [\"*\"]\ncapacity: 4\n";

/// A `drover-agent` with its own state dir.
pub struct AgentProc {
    pub id: String,
    pub server: String,
    pub state: tempfile::TempDir,
    child: Option<Child>,
    runs: u32,
}

impl AgentProc {
    pub fn new(server: &str) -> AgentProc {
        AgentProc::with_config(server, DEFAULT_AGENT_YAML)
    }

    /// An agent with this `agent.yaml` (its own, so no /etc/drover/agent.yaml
    /// interferes).
    pub fn with_config(server: &str, yaml: &str) -> AgentProc {
        let state = tempfile::tempdir().expect("temp dir");
        std::fs::write(state.path().join("agent.yaml"), yaml).expect("agent.yaml");
        AgentProc {
            id: String::new(),
            server: server.to_owned(),
            state,
            child: None,
            runs: 0,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// A `drover-agent` command for this agent's state dir and server.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("drover-agent"));
        cmd.arg("--state-dir")
            .arg(self.state_dir())
            .args(["--max-backoff", "2s", "--log-format", "json"])
            .args(args)
            .env("DROVER_AGENT_SERVER", &self.server)
            .env("DROVER_AGENT_CONFIG", self.state.path().join("agent.yaml"))
            .stdin(Stdio::null());
        cmd
    }

    pub fn log_path(&self, run: u32) -> PathBuf {
        self.state.path().join(format!("agent-{run}.log"))
    }

    /// The log of the latest run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.runs)).unwrap_or_default()
    }

    /// Starts `drover-agent run`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let log = File::create(self.log_path(self.runs)).expect("agent log");
        let child = self
            .command(&["run"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn drover-agent");
        self.child = Some(child);
    }

    /// Whether the agent started last is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the running agent to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        wait_exit(&mut child, timeout).await
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub async fn stop(&mut self) -> ExitStatus {
        let child = self.child.as_ref().expect("agent running");
        signal(child, libc::SIGTERM);
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// `drover-agent status --output json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .command(&["status", "--output", "json"])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

impl Drop for AgentProc {
    /// Stops the agent as a service manager would — SIGTERM, so that it
    /// stops its attempts and removes their containers — and kills it if
    /// it is still there after a while (a test that failed half-way must
    /// not leave containers behind).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP proxy on loopback between agents and the server that can cut the
/// network: while cut, open connections are dropped and new ones refused
/// at once, but both processes keep running. It runs on a thread of its own,
/// so it keeps forwarding while a test blocks on a CLI call.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped on every cut; connections of an older generation close.
    generation: tokio::sync::watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    /// Forwards a new loopback port to `target_port`.
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (generation, gen_rx) = tokio::sync::watch::channel(0u64);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cut2 = cut.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                loop {
                    let (mut inbound, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        r = listener.accept() => match r { Ok(c) => c, Err(_) => return },
                    };
                    if cut2.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let mut gen = gen_rx.clone();
                    let born = *gen.borrow();
                    tokio::spawn(async move {
                        let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = gen.wait_for(|g| *g != born) => {}
                        }
                    });
                }
            });
        });
        Proxy {
            port,
            cut,
            generation,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts the network: drops every open connection, refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP proxy on loopback between agents and the server that can hold
/// back one kind of request: while a path suffix is blocked, requests
/// whose path ends with it are answered 503 with `Retry-After` at once,
/// and everything else passes. It runs on a thread of its own.
pub struct HttpGate {
    pub port: u16,
    blocked: std::sync::Arc<std::sync::Mutex<Option<(String, u64)>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpGate {
    /// Forwards a new loopback port to the server on `target_port`.
    pub fn start(target_port: u16) -> HttpGate {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind gate");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("addr").port();
        let blocked: std::sync::Arc<std::sync::Mutex<Option<(String, u64)>>> =
            std::sync::Arc::default();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rules = blocked.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("gate runtime");
            rt.block_on(async move {
                let http = reqwest::Client::new();
                let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                    let http = http.clone();
                    let rules = rules.clone();
                    async move {
                        let rule = rules.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some((suffix, retry_after)) = rule {
                            if uri.path().ends_with(&suffix) {
                                return (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    [("retry-after", retry_after.to_string())],
                                    "held back by the test gate",
                                )
                                    .into_response();
                            }
                        }
                        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                        let mut req =
                            http.request(method, format!("http://127.0.0.1:{target_port}{path}"));
                        for (k, v) in &headers {
                            if k != "host" && k != "content-length" {
                                req = req.header(k, v);
                            }
                        }
                        match req.body(body).send().await {
                            Ok(r) => {
                                let status = r.status();
                                let mut out = HeaderMap::new();
                                for (k, v) in r.headers() {
                                    if k != "content-length" && k != "transfer-encoding" {
                                        out.insert(k, v.clone());
                                    }
                                }
                                let bytes = r.bytes().await.unwrap_or_default();
                                (status, out, bytes).into_response()
                            }
                            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
                        }
                    }
                };
                let app = axum::Router::new().fallback(handler);
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        HttpGate {
            port,
            blocked,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers requests whose path ends with `suffix` with 503 and
    /// `Retry-After: retry_after_secs` until `open`.
    pub fn block(&self, suffix: &str, retry_after_secs: u64) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((suffix.to_owned(), retry_after_secs));
    }

    pub fn open(&self) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for HttpGate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ---- TLS (issue 13, point 6) -------------------------------------------

/// The files of a server's TLS: its certificate and key, and the CA that
/// signed the certificate.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// A client that trusts the CA (and nothing else).
    pub fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca).expect("read the CA");
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"))
            .build()
            .expect("TLS client")
    }
}

/// A throwaway CA and a server certificate it signed, valid for
/// 127.0.0.1 and localhost, in files (rcgen).
pub struct TestPki {
    pub dir: tempfile::TempDir,
    /// `sha256:HEX` of the server certificate (DER).
    pub fingerprint: String,
    files: TlsFiles,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        use sha2::Digest;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "drover test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "drover test server");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let files = TlsFiles {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            ca: dir.path().join("ca.crt"),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        std::fs::write(&files.ca, ca_cert.pem()).expect("write CA");
        let fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert.der())));
        TestPki {
            dir,
            fingerprint,
            files,
        }
    }

    pub fn files(&self) -> TlsFiles {
        self.files.clone()
    }

    pub fn ca_file(&self) -> &Path {
        &self.files.ca
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A headless Chromium driven through chromedriver (WebDriver), for the
/// dashboard tests: Debian's `chromium` and `chromium-driver`, which
/// `scripts/test` installs when missing. Both processes end on drop.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
    /// Where `screenshot` saves PNGs (target/ui-screenshots/TEST).
    pub shots: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium
    /// with a fresh profile; `test` names the screenshot folder.
    pub async fn start(test: &str) -> Browser {
        use std::os::unix::process::CommandExt as _;
        let port = free_port();
        let driver_log =
            File::create(std::env::temp_dir().join(format!("chromedriver-{port}.log")))
                .expect("chromedriver log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Its own process group, so Chromium goes with it on drop.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(driver_log.try_clone().expect("log"))
            .stderr(driver_log)
            .spawn()
            .map(Driver)
            .expect("start chromedriver (apt-get install chromium chromium-driver)");
        let profile = tempfile::tempdir().expect("profile dir");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("chromedriver", Duration::from_secs(20), || {
            let req = http.get(format!("{url}/status")).send();
            async move { req.await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-background-networking",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // chromedriver speaks plain HTTP on loopback.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("start a Chromium session");
        let exe = std::env::current_exe().expect("current exe");
        // target/debug/deps/ui-xxxx -> target/ui-screenshots/TEST
        let shots = exe
            .ancestors()
            .nth(3)
            .expect("target dir")
            .join("ui-screenshots")
            .join(test);
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
            shots,
        }
    }

    /// Opens `url` and waits for the page.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("open page");
    }

    /// The text of the first element `css` selects.
    pub async fn text(&self, css: &str) -> String {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .text()
            .await
            .expect("element text")
    }

    /// The text of the first element `css` selects once there is one (a
    /// page still loading), up to 10 s.
    pub async fn wait_text(&self, css: &str) -> String {
        wait_for(css, Duration::from_secs(10), || async {
            match self.client.find(fantoccini::Locator::Css(css)).await {
                Ok(e) => e.text().await.ok(),
                Err(_) => None,
            }
        })
        .await
    }

    /// How many elements `css` selects.
    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(fantoccini::Locator::Css(css))
            .await
            .expect("find elements")
            .len()
    }

    /// The path of the page shown.
    pub async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current url")
            .path()
            .to_owned()
    }

    /// Logs in through the login form of the server at `url`; waits for
    /// the overview.
    pub async fn login(&self, url: &str, user: &str, password: &str) {
        self.goto(&format!("{url}/ui/login")).await;
        let form = self
            .client
            .form(fantoccini::Locator::Css("form.login"))
            .await
            .expect("the login form");
        form.set_by_name("username", user).await.expect("username");
        form.set_by_name("password", password)
            .await
            .expect("password");
        form.submit().await.expect("submit the login form");
        wait_for("the overview", Duration::from_secs(10), || async {
            (self.path().await == "/ui/").then_some(())
        })
        .await;
    }

    /// Clicks the element `css` and waits until the page path is `path`.
    pub async fn click_to(&self, css: &str, path: &str) {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
            .click()
            .await
            .expect("click");
        wait_for(path, Duration::from_secs(10), || async {
            (self.path().await == path).then_some(())
        })
        .await;
    }

    /// The value of the session cookie Chromium holds.
    pub async fn session_cookie(&self) -> String {
        self.client
            .get_named_cookie("drover_session")
            .await
            .expect("the session cookie")
            .value()
            .to_owned()
    }

    /// Fails if a dialog is open (a script ran, e.g. an XSS payload).
    pub async fn no_dialog(&self) {
        assert!(
            self.client.get_alert_text().await.is_err(),
            "a dialog opened: a script ran"
        );
    }

    /// Saves a PNG of the page as NAME.png; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

/// chromedriver, in its own process group; killed with the Chromium it
/// started on drop (also when a test fails while starting the browser).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on the process group of a child we started.
        unsafe {
            libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A POST of a dashboard form with the session cookie `cookie`, redirects
/// not followed; returns the status.
pub async fn post_ui_form(url: &str, cookie: &str, fields: &[(&str, &str)]) -> u16 {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
        .post(url)
        .header("Cookie", format!("drover_session={cookie}"))
        .form(fields)
        .send()
        .await
        .expect("POST the form")
        .status()
        .as_u16()
}
