//! Policies (issue 16): a script version (or an action with parameters)
//! bound to the agents a selector reaches, run by each agent on its own
//! clock (`every` or `cron`), always or only when its version changed.
//! Agents pull the set that applies to them (`DesiredState`), keep it on
//! disk, and report each run (`PolicyRunReport`) through their outbox.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::jobs::Outcome;
use crate::sandbox::Sandbox;

/// Shortest `every`.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest output of a run kept in its history, in bytes.
pub const MAX_RUN_OUTPUT: usize = 64 * 1024;
/// A force-run reaches the agents that poll within this time.
pub const FORCE_TTL: Duration = Duration::from_secs(3600);
/// Poll interval of agents whose group sets none.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// Most reports in one `POST /api/v1/agent/policy-runs`.
pub const MAX_RUN_BATCH: usize = 100;
/// Longest `error` of a run report, in bytes.
pub const MAX_RUN_ERROR: usize = 4096;

/// The file `drover policies apply -f` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub policies: Vec<PolicyDef>,
}

/// When a policy runs on an agent at its times.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RunMode {
    /// At every time of its schedule.
    #[default]
    Always,
    /// Only while the agent has not yet run its current version
    /// successfully: once per version, retried at its times until it
    /// succeeds.
    OnChange,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Always => "always",
            RunMode::OnChange => "on-change",
        }
    }
}

/// One policy as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyDef {
    /// Letters, digits, '-' and '_', starting with a letter; at most 64.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `NAME` (its latest version when applied) or `NAME@VERSION` (a
    /// sha256 or a unique prefix of one) of the scripts library.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// An action of the catalog, run with `params`; instead of `script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: BTreeMap<String, serde_json::Value>,
    /// The agents it applies to: a target selector (`group=web`, `*`).
    pub target: String,
    /// A fixed interval, e.g. `30s`, `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A five-field cron expression, e.g. `*/5 * * * *` (or six fields,
    /// seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The cron's time zone, e.g. `Europe/Paris` [default: UTC].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Each agent runs up to this much after each time, at an offset of
    /// its own (so a thousand agents do not fire at once), e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splay: Option<String>,
    #[serde(default)]
    pub run: RunMode,
    /// Longest run [default: the action's, or 5m for a script].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A sandbox profile of the catalog [default: the action's, or
    /// `process`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// A policy's times, checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Timing {
    Every {
        ms: u64,
    },
    Cron {
        expr: String,
        /// An IANA time zone name.
        timezone: String,
    },
}

/// Why a policy's fields are wrong: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn duration(name: &'static str, text: &str) -> Result<Duration, FieldError> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| {
        field(
            name,
            format!("'{text}' is not a duration ({e}); e.g. 30s, 5m"),
        )
    })
}

fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

impl Timing {
    /// The first time strictly after `after` (before any splay).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Timing::Every { ms } => {
                let ms = i64::try_from(*ms).ok()?.max(1);
                // Times fall on multiples of the interval since the epoch,
                // so every agent (and a restarted one) agrees on them.
                let now = after.timestamp_millis();
                let next = (now.div_euclid(ms) + 1) * ms;
                DateTime::from_timestamp_millis(next)
            }
            Timing::Cron { expr, timezone } => {
                let cron = parse_cron(expr).ok()?;
                let tz = chrono_tz::Tz::from_str(timezone).ok()?;
                cron.find_next_occurrence(&after.with_timezone(&tz), false)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Timing::Every { ms } => format!(
                "every {}",
                humantime_serde::re::humantime::format_duration(Duration::from_millis(*ms))
            ),
            Timing::Cron { expr, timezone } => format!("cron {expr} ({timezone})"),
        }
    }
}

impl PolicyDef {
    /// Checks what needs no catalog: the name, one of script and action,
    /// one of every and cron, the durations, the cron expression and time
    /// zone. Returns the timing, the splay and the timeout.
    pub fn check(&self) -> Result<(Timing, Duration, Option<Duration>), FieldError> {
        if !crate::scripts::is_script_name(&self.name) {
            return Err(field(
                "name",
                format!(
                    "'{}' is not a policy name (letters, digits, '-' and '_', starting with a \
                     letter; at most 64)",
                    self.name
                ),
            ));
        }
        match (&self.script, &self.action) {
            (Some(_), Some(_)) => return Err(field("script", "give script or action, not both")),
            (None, None) => return Err(field("script", "give script (or action)")),
            (Some(_), None) if !self.params.is_empty() => {
                return Err(field("params", "params go with an action, not a script"))
            }
            _ => {}
        }
        if self.target.trim().is_empty() {
            return Err(field("target", "is empty; '*' is every agent"));
        }
        let timing = match (&self.every, &self.cron) {
            (Some(_), Some(_)) => return Err(field("every", "give every or cron, not both")),
            (None, None) => return Err(field("every", "give every (or cron)")),
            (Some(every), None) => {
                if self.timezone.is_some() {
                    return Err(field("timezone", "goes with cron, not every"));
                }
                let d = duration("every", every)?;
                if d < MIN_EVERY {
                    return Err(field("every", format!("'{every}' is under 1s")));
                }
                Timing::Every {
                    ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                }
            }
            (None, Some(expr)) => {
                parse_cron(expr).map_err(|e| {
                    field("cron", format!("'{expr}' is not a cron expression: {e}"))
                })?;
                let tz = self.timezone.clone().unwrap_or_else(|| "UTC".to_owned());
                if chrono_tz::Tz::from_str(&tz).is_err() {
                    return Err(field(
                        "timezone",
                        format!("'{tz}' is not a time zone (e.g. UTC, Europe/Paris)"),
                    ));
                }
                Timing::Cron {
                    expr: expr.clone(),
                    timezone: tz,
                }
            }
        };
        let splay = match &self.splay {
            Some(s) => duration("splay", s)?,
            None => Duration::ZERO,
        };
        let timeout = match &self.timeout {
            Some(t) => {
                let d = duration("timeout", t)?;
                if d.is_zero() {
                    return Err(field("timeout", "must be above 0"));
                }
                Some(d)
            }
            None => None,
        };
        Ok((timing, splay, timeout))
    }
}

/// What a policy runs, resolved when applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicySource {
    Script {
        name: String,
        sha256: String,
        interpreter: String,
    },
    Action {
        name: String,
        /// The action's spec hash when applied.
        hash: String,
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        params: BTreeMap<String, serde_json::Value>,
        /// Its argv with the parameters in.
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
    },
}

/// A stored policy (`GET /api/v1/policies`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Policy {
    pub name: String,
    pub description: String,
    pub source: PolicySource,
    pub target: String,
    pub timing: Timing,
    pub splay_ms: u64,
    pub run: RunMode,
    pub timeout_ms: u64,
    /// The sandbox profile's name; `process` when none was given.
    pub sandbox: String,
    /// Names what agents run: the script's sha256, or a hash of the
    /// action's argv and environment.
    pub version: String,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/policies` answers which policies it created, updated and
/// found unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplyPoliciesResponse {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
}

/// `POST /api/v1/policies/{name}/run`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForceRunRequest {
    /// Only these of the policy's agents (a target selector); all of them
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A force-run, as the agents see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForceRun {
    pub id: String,
    pub policy: String,
    pub created_at: DateTime<Utc>,
}

/// How a desired policy runs on the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DesiredRun {
    /// Run `interpreter` with the script's path; the agent checks the
    /// content against `sha256` before every run.
    Script {
        sha256: String,
        interpreter: String,
        content: String,
    },
    Command {
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
    },
}

/// One policy that applies to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DesiredPolicy {
    pub name: String,
    pub version: String,
    pub run: DesiredRun,
    pub timing: Timing,
    pub splay_ms: u64,
    pub mode: RunMode,
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// The server's Ed25519 signature (hex) of `signing_message()`, made
    /// with the key that signs assignments: an agent that knows that key
    /// runs nothing whose signature does not verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl DesiredPolicy {
    /// The bytes the signature covers: the policy without its signature.
    pub fn signing_message(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = None;
        let mut out = b"drover-policy-v1\0".to_vec();
        // Serializing plain structs, strings and sorted maps cannot fail.
        out.extend(serde_json::to_vec(&unsigned).unwrap_or_default());
        out
    }
}

/// `GET /api/v1/agent/desired`: what the agent runs by itself. `etag` is
/// the hash of the rest; the agent sends it back (`If-None-Match`) and an
/// unchanged set answers 304.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub etag: String,
    /// How often to ask again (the agent's group's setting).
    pub poll_interval_ms: u64,
    pub policies: Vec<DesiredPolicy>,
    #[serde(default)]
    pub forces: Vec<ForceRun>,
}

/// Why a run started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Force,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Force => "force",
        }
    }
}

/// One run of a policy on an agent, as the agent reports it (kept in its
/// outbox until the server has it). `id` is the agent's own (a UUIDv7):
/// a report sent twice is stored once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyRunReport {
    pub id: String,
    pub policy: String,
    pub version: String,
    pub trigger: Trigger,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// stdout and stderr, interleaved, at most `MAX_RUN_OUTPUT` bytes.
    #[serde(default)]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /api/v1/agent/policy-runs`: reports, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyRunBatch {
    pub runs: Vec<PolicyRunReport>,
}

/// The answer to a batch: how many reports were new (a report the server
/// had already is not stored again).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRunsStored {
    pub stored: u64,
}

/// A run in the history (`GET /api/v1/policies/history`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRun {
    pub id: String,
    pub agent_id: String,
    pub policy: String,
    pub version: String,
    pub trigger: Trigger,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub output: String,
    pub error: Option<String>,
    /// When the server stored it (later than `finished_at` for a run
    /// made while the server was away).
    pub received_at: DateTime<Utc>,
}

/// A page of history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRunPage {
    pub runs: Vec<PolicyRun>,
    pub total: u64,
}

/// An agent's policy figures (`GET /api/v1/agents/{id}/policy-stats`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentPolicyStats {
    pub agent_id: String,
    pub last_poll_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub runs_24h: u64,
    pub failures_24h: u64,
    /// Succeeded ÷ runs over 24 h; absent without runs.
    pub success_rate_24h: Option<f64>,
}

/// `PUT /api/v1/groups/{name}`: a group's agent settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    /// How often its agents ask for their desired state, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
}

/// A group's settings as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Group {
    pub name: String,
    pub poll_interval_ms: Option<u64>,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// The hash of a set of desired policies and force-runs: its ETag.
pub fn desired_etag(
    poll_interval_ms: u64,
    policies: &[DesiredPolicy],
    forces: &[ForceRun],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(poll_interval_ms.to_le_bytes());
    for p in policies {
        h.update(p.name.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(p).unwrap_or_default());
        h.update([0]);
    }
    for f in forces {
        h.update(f.id.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut s = String::with_capacity(34);
    s.push('"');
    for b in &digest[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('"');
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn def(yaml: &str) -> PolicyDef {
        crate::yaml::from_str::<PolicyDef>(yaml, "p.yaml").unwrap()
    }

    #[test]
    fn fields_are_checked_and_named() {
        let ok = def("name: motd\nscript: motd\ntarget: '*'\nevery: 30s\nsplay: 5s\n");
        let (timing, splay, timeout) = ok.check().unwrap();
        assert_eq!(timing, Timing::Every { ms: 30_000 });
        assert_eq!(splay, Duration::from_secs(5));
        assert_eq!(timeout, None);
        let cron =
            def("name: c\naction: a\ntarget: '*'\ncron: '*/5 * * * *'\ntimezone: Europe/Paris\n");
        assert!(matches!(cron.check().unwrap().0, Timing::Cron { .. }));
        for (yaml, field) in [
            ("name: 9x\nscript: s\ntarget: '*'\nevery: 1s\n", "name"),
            ("name: x\ntarget: '*'\nevery: 1s\n", "script"),
            (
                "name: x\nscript: s\naction: a\ntarget: '*'\nevery: 1s\n",
                "script",
            ),
            ("name: x\nscript: s\ntarget: '*'\n", "every"),
            ("name: x\nscript: s\ntarget: '*'\nevery: soon\n", "every"),
            ("name: x\nscript: s\ntarget: '*'\nevery: 10ms\n", "every"),
            (
                "name: x\nscript: s\ntarget: '*'\ncron: '61 * * * *'\n",
                "cron",
            ),
            (
                "name: x\nscript: s\ntarget: '*'\ncron: '* * * * *'\ntimezone: Mars/Base\n",
                "timezone",
            ),
            (
                "name: x\nscript: s\ntarget: '*'\nevery: 1s\nsplay: lots\n",
                "splay",
            ),
            (
                "name: x\nscript: s\ntarget: '*'\nevery: 1s\ntimeout: 0s\n",
                "timeout",
            ),
            ("name: x\nscript: s\ntarget: ''\nevery: 1s\n", "target"),
            (
                "name: x\nscript: s\nparams: {a: 1}\ntarget: '*'\nevery: 1s\n",
                "params",
            ),
        ] {
            assert_eq!(def(yaml).check().unwrap_err().field, field, "{yaml}");
        }
        let unknown = crate::yaml::from_str::<PolicyFile>(
            "policies:\n  - name: x\n    script: s\n    target: '*'\n    evry: 1s\n",
            "p.yaml",
        )
        .unwrap_err();
        assert_eq!(unknown.line, Some(5), "{unknown}");
        assert!(unknown.to_string().contains("evry"), "{unknown}");
    }

    #[test]
    fn times_fall_on_the_interval_and_the_cron() {
        let t = DateTime::parse_from_rfc3339("2026-12-01T10:00:07Z")
            .unwrap()
            .with_timezone(&Utc);
        let every = Timing::Every { ms: 5_000 };
        assert_eq!(
            every.next_after(t).unwrap().to_rfc3339(),
            "2026-12-01T10:00:10+00:00"
        );
        let cron = Timing::Cron {
            expr: "*/5 * * * *".into(),
            timezone: "UTC".into(),
        };
        assert_eq!(
            cron.next_after(t).unwrap().to_rfc3339(),
            "2026-12-01T10:05:00+00:00"
        );
        let paris = Timing::Cron {
            expr: "0 12 * * *".into(),
            timezone: "Europe/Paris".into(),
        };
        assert_eq!(
            paris.next_after(t).unwrap().to_rfc3339(),
            "2026-12-01T11:00:00+00:00"
        );
    }
}
