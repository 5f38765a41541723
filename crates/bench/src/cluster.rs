//! The processes under measurement: one `drover server` and its agents, on
//! loopback, with every file in one temp dir. Children are killed on drop,
//! so an error anywhere leaves nothing running.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::api::{Agent, AgentStatus};

/// Where `drover` and `drover-agent` are, and how to start them.
#[derive(Debug, Clone)]
pub struct Setup {
    pub bin_dir: PathBuf,
    /// `None`: SQLite in the temp dir.
    pub database_url: Option<String>,
    pub log_level: String,
    /// Keep the temp dir (logs, database) after the run.
    pub keep: bool,
}

/// The admin password of the bench server (a fresh database takes it).
const ADMIN_PASSWORD: &str = "drover-bench-admin";

/// Locates the release binaries next to the bench binary.
pub fn default_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the drover-bench binary")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the drover-bench binary has no parent dir")
}

/// Path of a workspace binary in `dir`, or an error that says how to build it.
pub fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --release --bins` \
             (or pass --bin-dir)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// An enrolled, running agent.
#[derive(Debug)]
pub struct AgentProc {
    pub id: String,
    child: Child,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A running server, its admin session and its agents.
#[derive(Debug)]
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    setup: Setup,
    pub url: String,
    pub backend: &'static str,
    server: Child,
    pub token: String,
    pub http: reqwest::Client,
    pub agents: Vec<AgentProc>,
}

impl Cluster {
    /// Starts the server on a free loopback port and logs in as admin.
    pub async fn start(setup: &Setup) -> Result<Cluster> {
        let drover = binary(&setup.bin_dir, "drover")?;
        binary(&setup.bin_dir, "drover-agent")?;
        let dir = tempfile::Builder::new()
            .prefix("drover-bench-")
            .tempdir()
            .context("creating the temp dir")?;
        let root = dir.path().to_path_buf();
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let database_url = match &setup.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}/data/drover.db", root.display()),
        };
        let backend = if database_url.starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        };
        let log = File::create(root.join("server.log")).context("creating server.log")?;
        let server = Command::new(&drover)
            .arg("server")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(root.join("data"))
            .args(["--database-url", &database_url])
            .args(["--log-format", "json", "--log-level", &setup.log_level])
            .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("HOME", &root)
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env_remove("DROVER_CONFIG")
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning the server log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", drover.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let mut cluster = Cluster {
            dir: Some(dir),
            root,
            setup: setup.clone(),
            url,
            backend,
            server,
            token: String::new(),
            http,
            agents: Vec::new(),
        };
        cluster.wait_ready().await?;
        cluster.token = cluster.login().await?;
        Ok(cluster)
    }

    pub fn server_pid(&self) -> u32 {
        self.server.id()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self.server.try_wait().context("checking the server")? {
                let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
                bail!("the server exited with {status} at start:\n{log}");
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the server is not ready after 30 s (see {}/server.log)",
                    self.root.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn login(&self) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/api/v1/auth/login", self.url))
            .json(&serde_json::json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .context("logging in")?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.context("reading the login answer")?;
        if !status.is_success() {
            bail!(
                "admin login failed ({status}: {body}); with --database-url the database must be \
                 empty, so that the admin is created with the bench's password"
            );
        }
        body["token"]
            .as_str()
            .map(str::to_owned)
            .context("the login answer has no token")
    }

    /// A GET request as the admin.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// A one-time bootstrap token, made by `drover token create` as an
    /// operator would.
    fn bootstrap_token(&self) -> Result<String> {
        let drover = binary(&self.setup.bin_dir, "drover")?;
        let out = Command::new(&drover)
            .args(["token", "create"])
            .env("DROVER_SERVER", &self.url)
            .env("DROVER_TOKEN", &self.token)
            .env("HOME", &self.root)
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .stdin(Stdio::null())
            .output()
            .context("running drover token create")?;
        if !out.status.success() {
            bail!(
                "drover token create failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Enrolls an agent that may run every action, with `capacity` slots,
    /// and starts it.
    pub fn add_agent(&mut self, capacity: u32) -> Result<&AgentProc> {
        let agent_bin = binary(&self.setup.bin_dir, "drover-agent")?;
        let n = self.agents.len() + 1;
        let dir = self.root.join(format!("agent-{n}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("agent.yaml");
        std::fs::write(
            &config,
            format!("allow_actions: [\"*\"]\ncapacity: {capacity}\n"),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let command = |args: &[&str]| {
            let mut cmd = Command::new(&agent_bin);
            cmd.arg("--config")
                .arg(&config)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .args(["--server", &self.url])
                .args(["--log-format", "json", "--log-level", &self.setup.log_level])
                .args(args)
                .env("HOME", &self.root)
                .stdin(Stdio::null());
            cmd
        };
        let token = self.bootstrap_token()?;
        let out = command(&["enroll", "--token", &token])
            .output()
            .context("running drover-agent enroll")?;
        if !out.status.success() {
            bail!(
                "drover-agent enroll failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let log_path = dir.join("agent.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = command(&["run"])
            .stdout(log.try_clone().context("cloning the agent log handle")?)
            .stderr(log)
            .spawn()
            .context("starting drover-agent run")?;
        self.agents.push(AgentProc { id, child });
        let last = self.agents.len() - 1;
        Ok(&self.agents[last])
    }

    /// Waits until every agent is listed online.
    pub async fn wait_agents_online(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.agents.len() {
            loop {
                let id = self.agents[i].id.clone();
                let resp = self.get(&format!("/api/v1/agents/{id}")).send().await?;
                if resp.status().is_success() {
                    let agent: Agent = resp.json().await.context("reading an agent")?;
                    if agent.status == AgentStatus::Online {
                        break;
                    }
                }
                if let Some(status) = self.agents[i]
                    .child
                    .try_wait()
                    .context("checking an agent")?
                {
                    bail!(
                        "agent {id} exited with {status}; see {}/agent-{}/agent.log",
                        self.root.display(),
                        i + 1
                    );
                }
                if Instant::now() > deadline {
                    bail!("agent {id} is not online after 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        if self.setup.keep {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("kept {} (logs, database)", kept.display());
            }
        }
    }
}

/// `VmHWM` (peak) and `VmRSS` (current) of a process, in KiB, and the
/// current RSS split into anonymous memory and mapped files (mostly the
/// binary's own code).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub peak_kib: u64,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
}

/// Reads a process's memory figures from `/proc/PID/status`.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path}: no {name} line"))
    };
    Ok(Memory {
        peak_kib: field("VmHWM:")?,
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        file_kib: field("RssFile:")?,
    })
}

/// CPU time (user + system) a process has used so far, in milliseconds.
pub fn cpu_ms(pid: u32, ticks_per_sec: u64) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: bad field {}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(total as f64 * 1000.0 / ticks_per_sec.max(1) as f64)
}

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
