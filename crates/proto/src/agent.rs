//! The agent protocol: enrollment, credential refresh and heartbeats.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::sandbox::DockerStatus;

/// `POST /api/v1/agent/enroll`: trade a bootstrap token for an identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub hostname: String,
    pub agent_version: String,
}

/// The identity and first credentials of a newly enrolled agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub agent_id: String,
    pub credentials: Credentials,
    pub heartbeat_interval_secs: u64,
    /// The server's Ed25519 public key (64 hex digits) that signs
    /// assignments (`signing`); the agent keeps it and refuses assignments
    /// it does not verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_key: Option<String>,
}

/// A short-lived access JWT and the refresh token that renews it. The refresh
/// token rotates on every use; presenting a rotated one revokes the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Credentials {
    pub access_token: String,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_token: String,
}

/// `POST /api/v1/agent/refresh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// `POST /api/v1/agent/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub inventory: Inventory,
}

/// What the server prescribes in answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    pub heartbeat_interval_secs: u64,
    pub server_time: DateTime<Utc>,
    /// The key that signs assignments, for agents enrolled before the
    /// server signed them: one that knows no key yet keeps this one (trust
    /// on first use over its authenticated channel) and never replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_key: Option<String>,
}

/// What an agent knows about its machine, sent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub hostname: String,
    /// e.g. "Debian GNU/Linux".
    pub os: String,
    pub os_version: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    /// 1, 5 and 15 minute load averages.
    #[cfg_attr(feature = "openapi", schema(min_items = 3, max_items = 3))]
    pub load_avg: [f64; 3],
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Size and free space of the filesystem holding the agent's state dir.
    pub disk_total_bytes: u64,
    pub disk_available_bytes: u64,
    pub agent_version: String,
    /// Seconds since this agent process started.
    pub agent_uptime_secs: u64,
    /// Seconds since the machine booted.
    pub system_uptime_secs: u64,
    /// Most attempts the agent runs at once.
    #[serde(default)]
    pub capacity: u32,
    /// Attempts running now.
    #[serde(default)]
    pub running: u32,
    /// Sandbox kinds the agent accepts (`process`, `docker`).
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// The Docker engine the agent reaches, if it is configured to use one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerStatus>,
    /// Why the agent takes no new work, e.g. its state dir cannot be
    /// written (a full disk); absent when it takes work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Longest text field of an inventory the server keeps, in bytes.
pub const MAX_INVENTORY_TEXT: usize = 256;
/// Most entries of an inventory list the server keeps.
pub const MAX_INVENTORY_LIST: usize = 32;

/// `text` cut to `max` bytes (on a character boundary) with its control
/// characters replaced by U+FFFD: what the server stores of a field an
/// agent reports, so no agent can grow the database or drive a terminal.
pub fn bounded_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

fn bounded_list(list: &[String]) -> Vec<String> {
    list.iter()
        .take(MAX_INVENTORY_LIST)
        .map(|s| bounded_text(s, MAX_INVENTORY_TEXT))
        .collect()
}

impl Inventory {
    /// The inventory with every text field bounded and cleaned of control
    /// characters, every list bounded (the server keeps only this).
    pub fn bounded(&self) -> Inventory {
        let text = |s: &str| bounded_text(s, MAX_INVENTORY_TEXT);
        let opt = |s: &Option<String>| s.as_deref().map(text);
        Inventory {
            hostname: text(&self.hostname),
            os: text(&self.os),
            os_version: text(&self.os_version),
            kernel: text(&self.kernel),
            arch: text(&self.arch),
            agent_version: text(&self.agent_version),
            sandboxes: bounded_list(&self.sandboxes),
            docker: self.docker.as_ref().map(|d| DockerStatus {
                available: d.available,
                version: opt(&d.version),
                api_version: opt(&d.api_version),
                runtimes: bounded_list(&d.runtimes),
                engine_runtimes: bounded_list(&d.engine_runtimes),
                default_runtime: opt(&d.default_runtime),
                cgroup_version: opt(&d.cgroup_version),
                unenforced: bounded_list(&d.unenforced),
                error: d.error.as_deref().map(|e| bounded_text(e, 1024)),
            }),
            problem: self.problem.as_deref().map(|p| bounded_text(p, 1024)),
            ..self.clone()
        }
    }
}

/// Label keys whose values the agent reports rather than an operator sets:
/// `docker` and `runtime.*`.
pub fn is_reported_label(key: &str) -> bool {
    key == "docker" || key.starts_with("runtime.")
}

/// Facts about an agent that a target selects on besides its labels: what
/// its heartbeat inventory says (`hostname`, `os`, `os_version`, `kernel`,
/// `arch`, `cpus`, `agent_version`, `docker`, `runtime.*`) and its `group`.
/// Their names are reserved: no operator can set a label called so.
pub const FACT_KEYS: &[&str] = &[
    "hostname",
    "os",
    "os_version",
    "kernel",
    "arch",
    "cpus",
    "agent_version",
    "group",
    "docker",
];

/// Whether `key` names a fact (see [`FACT_KEYS`]) rather than a label.
pub fn is_fact_key(key: &str) -> bool {
    FACT_KEYS.contains(&key) || is_reported_label(key)
}

/// What an inventory says about the agent as labels a target can select
/// on: `docker=true|false`, and `runtime.runc=true` (runsc, kata) for each
/// sandbox runtime its engine offers.
pub fn reported_labels(inventory: Option<&Inventory>) -> Labels {
    let mut labels = Labels::new();
    let docker = inventory.and_then(|i| i.docker.as_ref());
    let available = docker.is_some_and(|d| d.available)
        && inventory.is_some_and(|i| i.sandboxes.iter().any(|s| s == "docker"));
    labels.insert("docker".to_owned(), available.to_string());
    if let (true, Some(d)) = (available, docker) {
        for r in &d.runtimes {
            labels.insert(format!("runtime.{r}"), "true".to_owned());
        }
    }
    labels
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[test]
    fn reported_text_is_bounded_and_printable() {
        assert_eq!(
            bounded_text("Debian\n\u{1b}[2J", 256),
            "Debian\u{fffd}\u{fffd}[2J"
        );
        assert_eq!(bounded_text(&"é".repeat(200), 9), "éééé");
        let inv = Inventory {
            kernel: "x".repeat(1_000_000),
            sandboxes: vec!["process".into(); 1000],
            ..Inventory::default()
        }
        .bounded();
        assert_eq!(inv.kernel.len(), MAX_INVENTORY_TEXT);
        assert_eq!(inv.sandboxes.len(), MAX_INVENTORY_LIST);
    }
}
