//! Sandboxes and workspaces: where an attempt runs and under which limits.
//!
//! A *sandbox profile* is a named entry of the catalog (`sandboxes:` in
//! `actions.yaml`). An action, a job or a workflow task names one; the
//! server resolves the name when the job is created and sends the whole
//! profile with every assignment, so the agent enforces exactly what was
//! submitted even if the catalog changes later. Two kinds exist:
//!
//! - `process`: the attempt is a process in its own process group, with
//!   rlimits (CPU time, address space, open files, processes) and optionally
//!   an unprivileged user;
//! - `docker`: the attempt is a container with CPU, memory and pids limits,
//!   no network unless the profile names one, a read-only root with a
//!   writable scratch dir, every capability dropped, no new privileges, and
//!   the chosen runtime (runc, runsc/gVisor, kata).
//!
//! A *workspace* is a directory (and, in a docker sandbox, a long-lived
//! container) that the tasks of one workflow run share on one agent.
//!
//! Key design decision: every rule about what a valid profile is lives here
//! as pure functions, so the server checks a catalog and the agent checks an
//! assignment with the same code.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the built-in profile: a plain process without limits.
pub const PROCESS: &str = "process";

/// Where the workspace is mounted in containers.
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// Where an attempt's own working dir is mounted in its container.
pub const WORK_MOUNT: &str = "/work";
/// Where the agent's files for the attempt (the outputs file) are mounted.
pub const DROVER_MOUNT: &str = "/drover";

/// Smallest memory limit the Docker engine accepts.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// A number of bytes, written `64m`, `1g`, `512k`, `1.5g` or as a plain
/// number. Suffixes count in powers of 1024, as Docker's do (`64m` is 64 MiB);
/// `mb`, `mib` and upper case are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim().to_ascii_lowercase();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            _ => {
                return Err(format!(
                    "'{text}' is not a size: write e.g. 64m, 1g, 512k or a number of bytes"
                ))
            }
        };
        let value: f64 = number.parse().map_err(|_| {
            format!("'{text}' is not a size: write e.g. 64m, 1g, 512k or a number of bytes")
        })?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > (1u64 << 50) as f64 {
            return Err(format!("size '{text}' is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly: `64m`, `1536k`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "t"), (30, "g"), (20, "m"), (10, "k")] {
            let size = 1u64 << shift;
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 64m, 1g or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A sandbox profile: its kind, name and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Sandbox {
    Process(ProcessSandbox),
    Docker(DockerSandbox),
}

/// A process in its own process group, with rlimits. Limits left out are
/// the agent's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessSandbox {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// CPU time (RLIMIT_CPU), e.g. "30s": SIGXCPU at the limit, SIGKILL a
    /// second later.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
    pub cpu_time: Option<Duration>,
    /// Address space (RLIMIT_AS), e.g. "512m": allocations beyond it fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "512m"))]
    pub address_space: Option<ByteSize>,
    /// Open files (RLIMIT_NOFILE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Processes of the user (RLIMIT_NPROC). The kernel does not apply it
    /// to root, so it needs `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    /// Run as this unprivileged user (a name or `uid[:gid]`); the agent
    /// must run as root to switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A container of the Docker engine the agent reaches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DockerSandbox {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The image, e.g. "debian:bookworm-slim".
    pub image: String,
    /// When to pull the image.
    #[serde(default)]
    pub pull: PullPolicy,
    /// CPUs, e.g. 0.5 (CFS quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory (and memory + swap: no swap), e.g. "64m". A container that
    /// goes beyond it is killed and the attempt reported as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "64m"))]
    pub memory: Option<ByteSize>,
    /// Most processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// `none` (the default: only a loopback interface), `bridge`, or the
    /// name of a Docker network. `host` and `container:…` are refused.
    #[serde(default = "default_network")]
    pub network: String,
    /// `runc`, `runsc` (gVisor), `kata`, or another runtime name of the
    /// engine. An agent that does not offer it refuses the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Mount the image's root read-only (the default).
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// Size of the writable scratch dir `/tmp` (a tmpfs).
    #[serde(default = "default_scratch")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "64m"))]
    pub scratch: ByteSize,
    /// Run as this user of the image (`uid[:gid]` or a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Capabilities given back after dropping them all, e.g. [CHOWN].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

fn default_network() -> String {
    "none".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_scratch() -> ByteSize {
    ByteSize(64 << 20)
}

/// When the agent pulls a docker sandbox's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when the engine does not have it.
    #[default]
    Missing,
    /// Never: an image the engine lacks fails the attempt.
    Never,
    /// Before every container.
    Always,
}

impl Sandbox {
    /// The built-in profile: a process with the agent's own limits.
    pub fn default_process() -> Sandbox {
        Sandbox::Process(ProcessSandbox {
            name: PROCESS.to_owned(),
            description: "A process in its own process group, without limits of its own".to_owned(),
            ..ProcessSandbox::default()
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Sandbox::Process(p) => &p.name,
            Sandbox::Docker(d) => &d.name,
        }
    }

    /// `process` or `docker`.
    pub fn kind(&self) -> &'static str {
        match self {
            Sandbox::Process(_) => "process",
            Sandbox::Docker(_) => "docker",
        }
    }

    pub fn docker(&self) -> Option<&DockerSandbox> {
        match self {
            Sandbox::Docker(d) => Some(d),
            Sandbox::Process(_) => None,
        }
    }

    /// A one-line summary of the limits, for listings.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        match self {
            Sandbox::Process(p) => {
                if let Some(t) = p.cpu_time {
                    parts.push(format!(
                        "cpu_time={}",
                        humantime_serde::re::humantime::format_duration(t)
                    ));
                }
                if let Some(m) = p.address_space {
                    parts.push(format!("address_space={m}"));
                }
                if let Some(n) = p.open_files {
                    parts.push(format!("open_files={n}"));
                }
                if let Some(n) = p.processes {
                    parts.push(format!("processes={n}"));
                }
                if let Some(u) = &p.user {
                    parts.push(format!("user={u}"));
                }
            }
            Sandbox::Docker(d) => {
                parts.push(format!("image={}", d.image));
                if let Some(c) = d.cpus {
                    parts.push(format!("cpus={c}"));
                }
                if let Some(m) = d.memory {
                    parts.push(format!("memory={m}"));
                }
                if let Some(n) = d.pids {
                    parts.push(format!("pids={n}"));
                }
                parts.push(format!("network={}", d.network));
                if let Some(r) = &d.runtime {
                    parts.push(format!("runtime={r}"));
                }
                if !d.read_only {
                    parts.push("read_only=false".to_owned());
                }
                if let Some(u) = &d.user {
                    parts.push(format!("user={u}"));
                }
            }
        }
        parts.join(" ")
    }

    /// Checks a profile. Errors name the profile and the field.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.name();
        if !is_profile_name(name) {
            return Err(format!(
                "sandbox name '{name}' is invalid: use 1-64 characters from a-z A-Z 0-9 _ -, starting with a letter"
            ));
        }
        let field = |f: &str, m: String| Err(format!("sandbox '{name}': {f}: {m}"));
        match self {
            Sandbox::Process(p) => {
                if p.cpu_time.is_some_and(|t| t < Duration::from_secs(1)) {
                    return field("cpu_time", "must be at least 1s".to_owned());
                }
                if p.address_space.is_some_and(|m| m.0 < (16 << 20)) {
                    return field(
                        "address_space",
                        "must be at least 16m (a process needs room for its libraries)".to_owned(),
                    );
                }
                if p.open_files.is_some_and(|n| !(3..=1 << 20).contains(&n)) {
                    return field("open_files", "must be between 3 and 1048576".to_owned());
                }
                if p.processes == Some(0) {
                    return field("processes", "must be at least 1".to_owned());
                }
                if let Some(u) = &p.user {
                    check_user(u).or_else(|m| field("user", m))?;
                }
            }
            Sandbox::Docker(d) => {
                check_image(&d.image).or_else(|m| field("image", m))?;
                if let Some(c) = d.cpus {
                    if !(c.is_finite() && (0.01..=1024.0).contains(&c)) {
                        return field("cpus", format!("{c} is not between 0.01 and 1024"));
                    }
                }
                if let Some(m) = d.memory {
                    if m.0 < MIN_MEMORY {
                        return field("memory", format!("{m} is below the engine's minimum of 6m"));
                    }
                }
                if d.pids == Some(0) {
                    return field("pids", "must be at least 1".to_owned());
                }
                check_network(&d.network).or_else(|m| field("network", m))?;
                if let Some(r) = &d.runtime {
                    if !is_token(r) {
                        return field("runtime", format!("'{r}' is not a runtime name"));
                    }
                }
                if d.scratch.0 < (1 << 20) {
                    return field("scratch", "must be at least 1m".to_owned());
                }
                if let Some(u) = &d.user {
                    check_user(u).or_else(|m| field("user", m))?;
                }
                for cap in &d.capabilities {
                    let ok = !cap.is_empty()
                        && cap.len() <= 32
                        && cap.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                    if !ok {
                        return field(
                            "capabilities",
                            format!("'{cap}' is not a capability name such as CHOWN"),
                        );
                    }
                    if matches!(
                        cap.as_str(),
                        "SYS_ADMIN" | "ALL" | "SYS_MODULE" | "SYS_PTRACE"
                    ) {
                        return field(
                            "capabilities",
                            format!("{cap} would undo the sandbox and is refused"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// A profile name: `[A-Za-z][A-Za-z0-9_-]{0,63}`.
pub fn is_profile_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_token(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// An image reference: `[registry/]name[:tag][@digest]`, nothing a shell or
/// the engine's flag parser could take for something else.
pub fn check_image(image: &str) -> Result<(), String> {
    let ok = (1..=255).contains(&image.len())
        && image.starts_with(|c: char| c.is_ascii_alphanumeric())
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{image}' is not an image reference such as debian:bookworm-slim"
        ))
    }
}

fn check_network(network: &str) -> Result<(), String> {
    if network == "host" || network.starts_with("container:") {
        return Err(format!(
            "'{network}' would share a network namespace outside the sandbox; use none, bridge or a named network"
        ));
    }
    if is_token(network) {
        Ok(())
    } else {
        Err(format!("'{network}' is not a network name"))
    }
}

/// A user: a name (`[a-z_][a-z0-9_-]*`) or `uid[:gid]`.
pub fn check_user(user: &str) -> Result<(), String> {
    let numeric = |s: &str| !s.is_empty() && s.len() <= 10 && s.chars().all(|c| c.is_ascii_digit());
    let ok = match user.split_once(':') {
        Some((u, g)) => numeric(u) && numeric(g),
        None => {
            numeric(user)
                || ((1..=32).contains(&user.len())
                    && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && user.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
                    }))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("'{user}' is not a user name or uid[:gid]"))
    }
}

/// The runtime names an engine may register for a generic runtime name
/// (`runc`, `runsc`, `kata`); any other name stands for itself.
pub fn runtime_aliases(runtime: &str) -> &'static [&'static str] {
    match runtime {
        "runc" => &["runc", "io.containerd.runc.v2"],
        "runsc" | "gvisor" => &["runsc", "runsc-kvm", "runsc-ptrace"],
        "kata" => &[
            "kata",
            "kata-runtime",
            "kata-qemu",
            "kata-clh",
            "kata-fc",
            "io.containerd.kata.v2",
        ],
        _ => &[],
    }
}

/// The generic runtime names (`runc`, `runsc`, `kata`) an engine with these
/// runtimes offers.
pub fn generic_runtimes<'a>(engine: impl IntoIterator<Item = &'a str> + Clone) -> Vec<String> {
    ["runc", "runsc", "kata"]
        .into_iter()
        .filter(|g| {
            engine
                .clone()
                .into_iter()
                .any(|e| runtime_aliases(g).contains(&e))
        })
        .map(str::to_owned)
        .collect()
}

/// A profile as `GET /api/v1/sandboxes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxEntry {
    pub profile: Sandbox,
    /// sha256 of the canonical JSON of the profile.
    pub hash: String,
    /// Built in (`process`), not from a catalog.
    pub builtin: bool,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A git checkout to provision a workspace with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// A URL (`https://`, `ssh://`, `git://`, `file://`) or a path on the
    /// agent's machine.
    pub repo: String,
    /// A branch, tag or commit; the remote's default branch when absent.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl GitSource {
    /// Refuses what git could take for an option or an unsafe transport.
    pub fn validate(&self) -> Result<(), String> {
        let repo = &self.repo;
        if repo.is_empty() || repo.len() > 2048 {
            return Err("git.repo must be 1 to 2048 characters".to_owned());
        }
        if repo.starts_with('-') {
            return Err(format!("git.repo '{repo}' must not start with '-'"));
        }
        if repo.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("git.repo must not contain spaces or control characters".to_owned());
        }
        if let Some((scheme, _)) = repo.split_once("::") {
            return Err(format!(
                "git.repo: the '{scheme}::' transport is refused; use https://, ssh://, git://, file:// or a path"
            ));
        }
        if let Some((scheme, _)) = repo.split_once("://") {
            if !matches!(scheme, "https" | "http" | "ssh" | "git" | "file") {
                return Err(format!(
                    "git.repo: scheme '{scheme}' is refused; use https://, ssh://, git://, file:// or a path"
                ));
            }
        }
        if let Some(r) = &self.reference {
            check_git_ref(r)?;
        }
        Ok(())
    }
}

/// A branch, tag or commit name: letters, digits and `._/-`, not starting
/// with `-` or `/`, no `..`.
pub fn check_git_ref(r: &str) -> Result<(), String> {
    let ok = (1..=255).contains(&r.len())
        && r.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && !r.contains("..")
        && !r.ends_with('/')
        && !r.ends_with(".lock")
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("git.ref '{r}' is not a branch, tag or commit name"))
    }
}

/// What an agent needs to know about a workspace: sent with the attempts
/// that create and remove it, and with every task that runs in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceSpec {
    /// Unique on the agent: names the directory, volume and container.
    pub id: String,
    /// With a docker sandbox the workspace has a long-lived container that
    /// the tasks run in; otherwise it is a directory.
    pub sandbox: Sandbox,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
}

/// The argv of the built-in attempt that creates a workspace.
pub const BUILTIN_WORKSPACE_CREATE: &str = "builtin:workspace-create";
/// The argv of the built-in attempt that removes a workspace.
pub const BUILTIN_WORKSPACE_REMOVE: &str = "builtin:workspace-remove";
/// The action name of the workspace attempts, as the agent's allow-list
/// sees it.
pub const WORKSPACE_ACTION: &str = "workspace";

/// Whether a workspace id is safe as a file, volume and container name.
pub fn valid_workspace_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A limit the attempt was stopped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LimitExceeded {
    /// The container went beyond its memory limit and was killed.
    Memory,
    /// The process used up its CPU time (SIGXCPU, then SIGKILL).
    CpuTime,
}

impl LimitExceeded {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitExceeded::Memory => "memory",
            LimitExceeded::CpuTime => "cpu_time",
        }
    }

    pub fn parse(s: &str) -> Option<LimitExceeded> {
        match s {
            "memory" => Some(LimitExceeded::Memory),
            "cpu_time" => Some(LimitExceeded::CpuTime),
            _ => None,
        }
    }
}

/// What an agent reports about its Docker engine in every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DockerStatus {
    /// The engine answered.
    pub available: bool,
    /// The engine's version, e.g. "20.10.24".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Sandbox runtimes offered, by generic name: runc, runsc, kata.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// Every runtime the engine registers, by its own name.
    #[serde(default)]
    pub engine_runtimes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_version: Option<String>,
    /// Limits the engine says it cannot enforce on this machine (memory,
    /// swap, cpu, pids); an attempt asking for one is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unenforced: Vec<String>,
    /// Why the engine is not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases = [
            ("64m", Some(64 << 20)),
            ("64M", Some(64 << 20)),
            ("64mb", Some(64 << 20)),
            ("64MiB", Some(64 << 20)),
            ("1g", Some(1 << 30)),
            ("1.5g", Some(3 << 29)),
            ("512k", Some(512 << 10)),
            ("4096", Some(4096)),
            (" 2 g ", Some(2 << 30)),
            ("", None),
            ("m", None),
            ("64q", None),
            ("-1m", None),
            ("1e3m", None),
        ];
        for (text, want) in cases {
            assert_eq!(ByteSize::parse(text).ok().map(|b| b.0), want, "{text:?}");
        }
        for (bytes, shown) in [
            (64 << 20, "64m"),
            (1536 << 10, "1536k"),
            (1 << 30, "1g"),
            (1000, "1000"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), shown);
        }
    }

    fn docker(yaml_extra: serde_json::Value) -> Result<Sandbox, String> {
        let mut v = serde_json::json!({"type": "docker", "name": "d", "image": "busybox"});
        if let (Some(m), Some(extra)) = (v.as_object_mut(), yaml_extra.as_object()) {
            for (k, x) in extra {
                m.insert(k.clone(), x.clone());
            }
        }
        let s: Sandbox = serde_json::from_value(v).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn docker_profiles_default_to_least_privilege() {
        let s = docker(serde_json::json!({})).unwrap();
        let d = s.docker().unwrap();
        assert_eq!(d.network, "none");
        assert!(d.read_only);
        assert_eq!(d.scratch, ByteSize(64 << 20));
        assert_eq!(d.pull, PullPolicy::Missing);
        assert!(d.capabilities.is_empty());
        // The canonical JSON keeps the size readable.
        let s = docker(serde_json::json!({"memory": "64m", "pids": 32})).unwrap();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["memory"], "64m");
        assert_eq!(json["type"], "docker");
        let back: Sandbox = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn bad_profiles_name_the_field() {
        let cases = [
            (serde_json::json!({"memory": "1m"}), "memory"),
            (serde_json::json!({"memory": "lots"}), "not a size"),
            (serde_json::json!({"network": "host"}), "network"),
            (serde_json::json!({"network": "container:x"}), "network"),
            (serde_json::json!({"image": "--privileged"}), "image"),
            (serde_json::json!({"image": "a b"}), "image"),
            (serde_json::json!({"cpus": 0}), "cpus"),
            (serde_json::json!({"pids": 0}), "pids"),
            (serde_json::json!({"runtime": "run;sc"}), "runtime"),
            (serde_json::json!({"user": "root; id"}), "user"),
            (
                serde_json::json!({"capabilities": ["SYS_ADMIN"]}),
                "SYS_ADMIN",
            ),
            (
                serde_json::json!({"capabilities": ["chown"]}),
                "capabilities",
            ),
            (serde_json::json!({"privileged": true}), "privileged"),
            (serde_json::json!({"name": "9x"}), "sandbox name"),
        ];
        for (extra, want) in cases {
            let err = docker(extra.clone()).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let p: Result<Sandbox, _> = serde_json::from_value(
            serde_json::json!({"type": "process", "name": "p", "cpu_time": "1s", "nice": 3}),
        );
        assert!(p.unwrap_err().to_string().contains("nice"));
        let p: Sandbox = serde_json::from_value(
            serde_json::json!({"type": "process", "name": "p", "address_space": "1m"}),
        )
        .unwrap();
        assert!(p.validate().unwrap_err().contains("address_space"));
        let p: Result<Sandbox, _> =
            serde_json::from_value(serde_json::json!({"type": "vm", "name": "p"}));
        assert!(p.is_err());
    }

    #[test]
    fn users() {
        for ok in ["nobody", "65534", "65534:65534", "_build", "ci-runner"] {
            assert!(check_user(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Root", "1:", ":1", "a b", "x;y", "-u"] {
            assert!(check_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runtimes() {
        assert_eq!(
            generic_runtimes(["runc", "io.containerd.runc.v2"]),
            vec!["runc"]
        );
        assert_eq!(
            generic_runtimes(["io.containerd.runc.v2", "runsc", "kata-qemu"]),
            vec!["runc", "runsc", "kata"]
        );
        assert!(generic_runtimes(["crun"]).is_empty());
    }

    #[test]
    fn git_sources() {
        let ok = [
            ("https://example.com/a.git", Some("main")),
            ("/srv/repos/app.git", Some("v1.2.3")),
            ("file:///tmp/r", Some("0123abcd")),
            ("git@example.com:a/b.git", None),
            ("ssh://git@example.com/a", Some("feature/x-y")),
        ];
        for (repo, r) in ok {
            let g = GitSource {
                repo: repo.into(),
                reference: r.map(Into::into),
            };
            assert!(g.validate().is_ok(), "{repo} {r:?}");
        }
        let bad = [
            ("--upload-pack=touch /tmp/x", None),
            ("ext::sh -c touch% /tmp/pwned", None),
            ("fd::3", None),
            ("ftp://example.com/a", None),
            ("/srv/a b", None),
            ("/srv/a", Some("--orphan")),
            ("/srv/a", Some("a..b")),
            ("/srv/a", Some("main;id")),
            ("/srv/a", Some("/abs")),
        ];
        for (repo, r) in bad {
            let g = GitSource {
                repo: repo.into(),
                reference: r.map(Into::into),
            };
            assert!(g.validate().is_err(), "{repo} {r:?}");
        }
    }

    #[test]
    fn workspace_ids() {
        assert!(valid_workspace_id("0192f0c3-7a1e-7d2b-9f00-1234567890ab"));
        for bad in ["", "-x", "a/b", "a.b", "../x"] {
            assert!(!valid_workspace_id(bad), "{bad}");
        }
    }
}
