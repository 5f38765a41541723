//! The engine of an agent: the connection (its API version agreed on
//! first use), what the engine offers (runtimes, the limits it enforces),
//! probed for the inventory and cached for the checks of each attempt, and
//! the clean-up of the attempt containers a killed agent left behind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_proto::sandbox::{generic_runtimes, runtime_aliases, DockerSandbox, DockerStatus};

use super::api::{self, Client, Endpoint};
use super::{remove_container, Error, LABEL_AGENT, LABEL_KIND, LABEL_MANAGED};
use crate::config::DockerHost;
use crate::executor::{Failure, Refusal};

/// Longest wait for the engine's answer to a probe (inventory, facts).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How old the engine's runtimes and limits may be when an attempt is
/// checked against them.
const FACTS_MAX_AGE: Duration = Duration::from_secs(30);

/// What the engine offers, cached for the checks of each attempt.
#[derive(Debug, Clone)]
struct Facts {
    at: Instant,
    /// The engine's own runtime names.
    runtimes: Vec<String>,
    /// Limits it cannot enforce: memory, swap, cpu, pids.
    unenforced: Vec<String>,
}

/// The Docker engine of an agent: connected on first use, then reused.
pub struct Engine {
    host: DockerHost,
    agent_id: String,
    client: tokio::sync::Mutex<Option<Client>>,
    facts: Mutex<Option<Facts>>,
    status: Mutex<Option<(Instant, DockerStatus)>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("host", &self.host.to_string())
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// The engine at `host`, for the agent `agent_id` (its containers are
    /// labelled with it). Nothing is connected yet.
    pub fn new(host: DockerHost, agent_id: &str) -> Engine {
        Engine {
            host,
            agent_id: agent_id.to_owned(),
            client: tokio::sync::Mutex::new(None),
            facts: Mutex::new(None),
            status: Mutex::new(None),
        }
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    fn unreachable(&self, message: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            host: self.host.to_string(),
            message: message.to_string(),
        }
    }

    /// The connected client, its API version agreed with the engine (an
    /// older engine refuses newer clients).
    pub(crate) async fn client(&self) -> Result<Client, Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let endpoint = match &self.host {
            DockerHost::Unix(path) => Endpoint::Unix(path.clone()),
            DockerHost::Http(addr) => Endpoint::Tcp(addr.clone()),
            DockerHost::Off => return Err(self.unreachable("Docker is off (docker_host: off)")),
        };
        let client = tokio::time::timeout(
            PROBE_TIMEOUT,
            Client::connect(endpoint, self.host.to_string()),
        )
        .await
        .map_err(|_| self.unreachable("no answer to /version"))??;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Asks the engine what it is and offers, within a few seconds. Never
    /// fails: an unreachable engine is reported as such.
    pub async fn status(&self) -> DockerStatus {
        let status = match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => unavailable(e.to_string()),
            Err(_) => unavailable(
                self.unreachable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs()))
                    .to_string(),
            ),
        };
        *lock(&self.status) = Some((Instant::now(), status.clone()));
        status
    }

    /// The last status if it is younger than `max_age`, else a new one.
    pub async fn status_at_most(&self, max_age: Duration) -> DockerStatus {
        if let Some((at, status)) = &*lock(&self.status) {
            if at.elapsed() < max_age {
                return status.clone();
            }
        }
        self.status().await
    }

    async fn probe(&self) -> Result<DockerStatus, Error> {
        let client = self.client().await?;
        let info = client.info().await?;
        let version = client.version().await?;
        let mut runtimes: Vec<String> = info.runtimes.clone();
        runtimes.sort();
        let unenforced = unenforced_limits(&info);
        *lock(&self.facts) = Some(Facts {
            at: Instant::now(),
            runtimes: runtimes.clone(),
            unenforced: unenforced.clone(),
        });
        Ok(DockerStatus {
            available: true,
            version: version.version,
            api_version: version.api_version,
            runtimes: generic_runtimes(runtimes.iter().map(String::as_str)),
            engine_runtimes: runtimes,
            default_runtime: info.default_runtime,
            cgroup_version: info.cgroup_version.filter(|v| !v.is_empty()),
            unenforced,
            error: None,
        })
    }

    /// The engine's runtimes and unenforced limits, at most
    /// `FACTS_MAX_AGE` old.
    async fn facts(&self) -> Result<Facts, Error> {
        if let Some(f) = &*lock(&self.facts) {
            if f.at.elapsed() < FACTS_MAX_AGE {
                return Ok(f.clone());
            }
        }
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe()).await {
            Ok(Ok(_)) => lock(&self.facts)
                .clone()
                .ok_or_else(|| self.unreachable("no answer to /info")),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                Err(self.unreachable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())))
            }
        }
    }

    /// Removes the attempt containers this agent left behind (it was
    /// killed, or the host rebooted): every state, this agent's only.
    /// Workspace containers stay: their runs remove them.
    pub async fn remove_leftover_attempts(&self) -> Result<usize, Error> {
        let client = self.client().await?;
        let list = client
            .list_containers(&[
                format!("{LABEL_AGENT}={}", self.agent_id),
                format!("{LABEL_KIND}=attempt"),
            ])
            .await?;
        let mut removed = 0;
        for c in list {
            match remove_container(&client, &c.id).await {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(container = %c.id, names = ?c.names, "removed a leftover attempt container");
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %e, "could not remove a leftover attempt container")
                }
            }
        }
        Ok(removed)
    }

    /// Removes the container `name` (an attempt's), whatever its state; a
    /// missing one is fine.
    pub(crate) async fn remove_container_named(&self, name: &str) -> Result<(), Error> {
        let client = self.client().await?;
        remove_container(&client, name).await
    }

    pub(super) fn labels(&self, kind: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_AGENT.to_owned(), self.agent_id.clone()),
            (LABEL_KIND.to_owned(), kind.to_owned()),
        ]);
        for (k, v) in extra {
            labels.insert((*k).to_owned(), (*v).to_owned());
        }
        labels
    }

    /// The checks of a profile against what the engine offers: the
    /// engine's name for its runtime, or why it cannot run here.
    pub(super) async fn admit(&self, sandbox: &DockerSandbox) -> Result<Option<String>, Failure> {
        let facts = self.facts().await?;
        check_enforced(sandbox, &facts.unenforced)?;
        Ok(engine_runtime(sandbox.runtime.as_deref(), &facts.runtimes)?)
    }
}

fn unavailable(error: String) -> DockerStatus {
    DockerStatus {
        available: false,
        error: Some(error),
        ..DockerStatus::default()
    }
}

/// The limits an engine's `/info` says it cannot enforce.
pub(crate) fn unenforced_limits(info: &api::Info) -> Vec<String> {
    [
        ("memory", info.memory_limit),
        ("swap", info.swap_limit),
        ("cpu", info.cpu_cfs_quota),
        ("pids", info.pids_limit),
    ]
    .into_iter()
    .filter(|(_, enforced)| *enforced == Some(false))
    .map(|(name, _)| name.to_owned())
    .collect()
}

/// Refuses a profile asking for a limit the engine cannot enforce (the
/// engine would only warn and run the container without it).
pub(crate) fn check_enforced(
    sandbox: &DockerSandbox,
    unenforced: &[String],
) -> Result<(), Refusal> {
    let asked = [
        ("memory", sandbox.memory.is_some()),
        // Memory comes with an equal memory + swap limit (no swap).
        ("swap", sandbox.memory.is_some()),
        ("cpu", sandbox.cpus.is_some()),
        ("pids", sandbox.pids.is_some()),
    ];
    let missing: Vec<&'static str> = asked
        .into_iter()
        .filter(|(name, asked)| *asked && unenforced.iter().any(|u| u == name))
        .map(|(name, _)| name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Refusal::Unenforced {
        sandbox: sandbox.name.clone(),
        limits: missing,
    })
}

/// The engine's name for the runtime a profile asks for (`None`: the
/// engine's default), or why none fits.
pub(crate) fn engine_runtime(
    wanted: Option<&str>,
    engine: &[String],
) -> Result<Option<String>, Refusal> {
    let Some(wanted) = wanted else {
        return Ok(None);
    };
    let aliases = runtime_aliases(wanted);
    let candidates: Vec<&str> = if aliases.is_empty() {
        vec![wanted]
    } else {
        aliases.to_vec()
    };
    candidates
        .into_iter()
        .find(|c| engine.iter().any(|e| e == c))
        .map(|c| Some(c.to_owned()))
        .ok_or_else(|| Refusal::NoRuntime {
            wanted: wanted.to_owned(),
            engine: engine.to_vec(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_support::docker_profile as profile;

    #[test]
    fn unenforced_limits_table() {
        let info = |memory, swap, cpu, pids| api::Info {
            memory_limit: memory,
            swap_limit: swap,
            cpu_cfs_quota: cpu,
            pids_limit: pids,
            ..api::Info::default()
        };
        let cases = [
            (info(Some(true), Some(true), Some(true), Some(true)), vec![]),
            (
                info(Some(false), Some(false), Some(true), Some(false)),
                vec!["memory", "swap", "pids"],
            ),
            (
                info(Some(true), Some(false), Some(false), None),
                vec!["swap", "cpu"],
            ),
            // An engine that does not say is taken at its word.
            (info(None, None, None, None), vec![]),
        ];
        for (info, want) in cases {
            assert_eq!(unenforced_limits(&info), want);
        }
    }

    #[test]
    fn unenforced_limits_reject_profiles_that_ask_for_them() {
        let cases = [
            (
                serde_json::json!({}),
                vec!["memory", "swap", "cpu", "pids"],
                None,
            ),
            (
                serde_json::json!({"memory": "64m"}),
                vec!["swap"],
                Some("cannot enforce: swap"),
            ),
            (
                serde_json::json!({"memory": "64m", "cpus": 1, "pids": 5}),
                vec!["memory", "cpu", "pids"],
                Some("cannot enforce: memory, cpu, pids"),
            ),
            (serde_json::json!({"pids": 5}), vec!["memory", "swap"], None),
        ];
        for (extra, unenforced, want) in cases {
            let unenforced: Vec<String> = unenforced.into_iter().map(String::from).collect();
            let got = check_enforced(&profile(extra.clone()), &unenforced);
            match want {
                None => assert!(got.is_ok(), "{extra}: {got:?}"),
                Some(text) => {
                    let err = got.unwrap_err().to_string();
                    assert!(
                        err.contains(text) && err.contains("sandbox 'd'"),
                        "{extra}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn runtimes_are_mapped_to_the_engines_names() {
        let engine: Vec<String> = ["io.containerd.runc.v2", "runsc-kvm", "crun"]
            .into_iter()
            .map(String::from)
            .collect();
        let cases = [
            (None, Ok(None)),
            (Some("runc"), Ok(Some("io.containerd.runc.v2"))),
            (Some("runsc"), Ok(Some("runsc-kvm"))),
            (Some("gvisor"), Ok(Some("runsc-kvm"))),
            (Some("crun"), Ok(Some("crun"))),
            (
                Some("kata"),
                Err("runtime 'kata' is not available on this agent (the engine offers: io.containerd.runc.v2, runsc-kvm, crun)"),
            ),
            (
                Some("youki"),
                Err("runtime 'youki' is not available on this agent (the engine offers: io.containerd.runc.v2, runsc-kvm, crun)"),
            ),
        ];
        for (wanted, want) in cases {
            let got = engine_runtime(wanted, &engine).map_err(|e| e.to_string());
            assert_eq!(
                got,
                want.map(|o| o.map(String::from)).map_err(String::from),
                "{wanted:?}"
            );
        }
        assert_eq!(
            engine_runtime(Some("runsc"), &[]).map_err(|e| e.to_string()),
            Err("runtime 'runsc' is not available on this agent (the engine offers: none)".into())
        );
    }
}
