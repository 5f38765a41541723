//! Job targets: which agents a selector names. Pure parsing and matching.
//! Labels are those an operator set plus those the agent reports about
//! itself (`docker=true`, `runtime.runsc=true`), so `--target docker=true`
//! picks the agents that can run containers.

use drover_proto::agent::{is_reported_label, reported_labels};
use drover_proto::labels::{check_group, parse_pair};
use drover_store::AgentRecord;

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// An agent id or a unique prefix of one.
    Agent(String),
    /// Every label must be present with this value: `role=web,env=prod`.
    Labels(Vec<(String, String)>),
    /// `group:NAME`.
    Group(String),
    /// `*`: every agent.
    All,
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "target is empty: give an agent id, key=value[,key=value], group:NAME or *"
                    .to_owned(),
            );
        }
        if s == "*" {
            return Ok(Selector::All);
        }
        if let Some(g) = s.strip_prefix("group:") {
            check_group(g).map_err(|e| e.to_string())?;
            return Ok(Selector::Group(g.to_owned()));
        }
        if s.contains('=') {
            let pairs = s
                .split(',')
                .map(|p| parse_pair(p.trim()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Selector::Labels(pairs));
        }
        if s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Ok(Selector::Agent(s.to_ascii_lowercase()));
        }
        Err(format!(
            "target '{s}' is not an agent id, key=value[,key=value], group:NAME or *"
        ))
    }

    /// Whether a (non-agent-id) selector matches an agent.
    pub fn matches(&self, agent: &AgentRecord) -> bool {
        match self {
            Selector::All => true,
            Selector::Group(g) => agent.group.as_deref() == Some(g.as_str()),
            Selector::Labels(pairs) => {
                let reported = pairs
                    .iter()
                    .any(|(k, _)| is_reported_label(k))
                    .then(|| reported_labels(agent.inventory.as_ref()));
                pairs.iter().all(|(k, v)| {
                    let have = match &reported {
                        Some(r) if is_reported_label(k) => r.get(k),
                        _ => agent.labels.get(k),
                    };
                    have.is_some_and(|have| have == v)
                })
            }
            Selector::Agent(id) => agent.id == *id,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn agent(id: &str, labels: &[(&str, &str)], group: Option<&str>) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            hostname: "h".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            group: group.map(Into::into),
            agent_version: None,
            enrolled_at: Utc::now(),
            last_seen_at: None,
            inventory: None,
            session_id: None,
            session_ended_reason: None,
            revoked_at: None,
            revoked_reason: None,
            dispatch: drover_proto::api::DispatchState::Active,
            dispatch_reason: None,
            dispatch_force: false,
        }
    }

    #[test]
    fn parses() {
        let cases = [
            ("*", Ok(Selector::All)),
            ("group:web", Ok(Selector::Group("web".into()))),
            (
                "role=web",
                Ok(Selector::Labels(vec![("role".into(), "web".into())])),
            ),
            (
                "role=web, env=prod",
                Ok(Selector::Labels(vec![
                    ("role".into(), "web".into()),
                    ("env".into(), "prod".into()),
                ])),
            ),
            ("0192ABCD-1", Ok(Selector::Agent("0192abcd-1".into()))),
        ];
        for (s, want) in cases {
            assert_eq!(Selector::parse(s), want, "{s}");
        }
        for bad in ["", "group:", "role=$(id)", "web;rm", "host name"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_labels_and_groups() {
        let web = agent("a", &[("role", "web"), ("env", "prod")], Some("eu"));
        let db = agent("b", &[("role", "db")], None);
        let sel = Selector::parse("role=web,env=prod").unwrap();
        assert!(sel.matches(&web) && !sel.matches(&db));
        let sel = Selector::parse("group:eu").unwrap();
        assert!(sel.matches(&web) && !sel.matches(&db));
        assert!(Selector::All.matches(&db));
    }

    #[test]
    fn reported_labels_select_on_what_the_agent_offers() {
        use drover_proto::agent::Inventory;
        use drover_proto::sandbox::DockerStatus;
        let with = |docker: Option<DockerStatus>, kinds: &[&str]| {
            let mut a = agent("a", &[("docker", "false")], None);
            a.inventory = Some(Inventory {
                docker,
                sandboxes: kinds.iter().map(|k| k.to_string()).collect(),
                ..Inventory::default()
            });
            a
        };
        let engine = |runtimes: &[&str]| {
            Some(DockerStatus {
                available: true,
                runtimes: runtimes.iter().map(|r| r.to_string()).collect(),
                ..DockerStatus::default()
            })
        };
        let docker = Selector::parse("docker=true").unwrap();
        let gvisor = Selector::parse("docker=true,runtime.runsc=true").unwrap();
        let no_docker = Selector::parse("docker=false").unwrap();
        let cases = [
            (with(engine(&["runc"]), &["process", "docker"]), true, false),
            (
                with(engine(&["runc", "runsc"]), &["process", "docker"]),
                true,
                true,
            ),
            // Reachable, but the agent does not accept docker sandboxes.
            (with(engine(&["runc"]), &["process"]), false, false),
            (
                with(
                    Some(DockerStatus {
                        available: false,
                        error: Some("connection refused".into()),
                        ..DockerStatus::default()
                    }),
                    &["process", "docker"],
                ),
                false,
                false,
            ),
            (with(None, &["process", "docker"]), false, false),
        ];
        for (i, (a, want_docker, want_gvisor)) in cases.iter().enumerate() {
            // A label an operator set never overrides what is reported.
            assert_eq!(docker.matches(a), *want_docker, "case {i}");
            assert_eq!(no_docker.matches(a), !*want_docker, "case {i}");
            assert_eq!(gvisor.matches(a), *want_gvisor, "case {i}");
        }
        // No inventory yet: nothing is known to be offered.
        assert!(!docker.matches(&agent("b", &[], None)));
    }
}
