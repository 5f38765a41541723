//! The heartbeat loop: heartbeat at the interval the server prescribes,
//! back off with jitter while the server is unreachable, and stop for good
//! when it refuses the credentials (refreshing them is the shared
//! session's job, see `session`). It alone writes the local state.
//!
//! Each heartbeat carries the inventory: the machine (`inventory`), the
//! agent's capacity, running attempts and sandbox kinds, and what its
//! Docker engine offers, probed at most every 30 s and within a few
//! seconds, so a slow or absent engine never holds a heartbeat back.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use drover_proto::agent::{HeartbeatRequest, HeartbeatResponse};
use tokio_util::sync::CancellationToken;

use crate::client::ClientError;
use crate::config::AgentConfig;
use crate::docker::Engine;
use crate::inventory::Collector;
use crate::jobs::Jobs;
use crate::session::Session;
use crate::state::{LocalState, StateDir};
use crate::Error;

/// Rewrite the local state at least this often while all is well.
const STATE_WRITE_EVERY: chrono::Duration = chrono::Duration::seconds(60);
/// Ask the Docker engine what it offers at most this often.
const DOCKER_PROBE_EVERY: Duration = Duration::from_secs(30);

/// What the heartbeat reports about the agent's work, besides the machine.
pub(crate) struct Reported {
    pub capacity: u32,
    /// Sandbox kinds the agent runs.
    pub sandboxes: Vec<String>,
    pub jobs: Arc<Jobs>,
    /// The Docker engine, when Docker is not off.
    pub docker: Option<Arc<Engine>>,
}

/// Exponential backoff with jitter: each wait is drawn between half and all
/// of a ceiling that doubles from 1 s up to the configured cap.
#[derive(Debug)]
pub(crate) struct Backoff {
    ceiling: Duration,
    max: Duration,
    pub(crate) failures: u32,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            ceiling: Duration::from_secs(1),
            max,
            failures: 0,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        self.failures += 1;
        let ceiling = self.ceiling.min(self.max);
        self.ceiling = (self.ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn reset(&mut self) {
        self.ceiling = Duration::from_secs(1);
        self.failures = 0;
    }
}

/// Spreads heartbeats of many agents: ±10 % of the interval.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * fastrand::f64())
}

pub(crate) struct Runner {
    session: Arc<Session>,
    dir: StateDir,
    local: LocalState,
    collector: Collector,
    reported: Reported,
    backoff: Backoff,
    last_state_write: Option<chrono::DateTime<Utc>>,
    /// The server named another assignment key, and this was logged.
    key_mismatch_reported: bool,
}

impl Runner {
    pub(crate) fn new(
        config: &AgentConfig,
        session: Arc<Session>,
        dir: StateDir,
        local: LocalState,
        reported: Reported,
    ) -> Result<Runner, Error> {
        Ok(Runner {
            session,
            dir,
            local,
            collector: Collector::new(),
            reported,
            backoff: Backoff::new(config.max_backoff),
            last_state_write: None,
            key_mismatch_reported: false,
        })
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let rejected = self.session.rejected().clone();
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = rejected.cancelled() => return Err(self.record_rejection()),
                r = self.beat() => r,
            };
            let wait = match outcome {
                Ok(resp) => {
                    self.contact_ok(resp.heartbeat_interval_secs);
                    if let Some(key) = &resp.assignment_key {
                        self.learn_assignment_key(key);
                    }
                    jittered(Duration::from_secs(resp.heartbeat_interval_secs.max(1)))
                }
                Err(e) if e.is_terminal() => return Err(self.record_rejection()),
                Err(e) => {
                    let wait = self.backoff.next().max(e.retry_after().unwrap_or_default());
                    tracing::warn!(
                        error = %e,
                        failures = self.backoff.failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "heartbeat failed"
                    );
                    self.local.last_error = Some(e.to_string());
                    self.local.last_error_at = Some(Utc::now());
                    self.save_state();
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = rejected.cancelled() => return Err(self.record_rejection()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.save_state();
        Ok(())
    }

    /// Remembers in the local state that the credentials are dead, so that
    /// a restart does not try them again.
    fn record_rejection(&mut self) -> Error {
        let why = self
            .session
            .rejection()
            .unwrap_or_else(|| "credentials refused".to_owned());
        self.local.credentials_rejected = Some(why.clone());
        self.local.last_error = Some(why.clone());
        self.local.last_error_at = Some(Utc::now());
        self.save_state();
        Error::CredentialsRejected(why)
    }

    async fn beat(&mut self) -> Result<HeartbeatResponse, ClientError> {
        let mut inventory = self.collector.collect(self.dir.path());
        inventory.capacity = self.reported.capacity;
        inventory.running = self.reported.jobs.running_count();
        inventory.problem = self.reported.jobs.problem();
        inventory.sandboxes = self.reported.sandboxes.clone();
        inventory.docker = match &self.reported.docker {
            Some(engine) => Some(engine.status_at_most(DOCKER_PROBE_EVERY).await),
            None => None,
        };
        let req = &HeartbeatRequest { inventory };
        self.session
            .call(|client, token| async move { client.heartbeat(&token, req).await })
            .await
    }

    /// Trust on first use: an agent that knows no key yet (enrolled before
    /// the server signed assignments) keeps the one its authenticated
    /// heartbeat answer names, on disk first. A known key is never
    /// replaced: a different one is reported, and assignments signed
    /// with it are refused until the agent is enrolled again.
    fn learn_assignment_key(&mut self, text: &str) {
        let key = match drover_proto::signing::parse_public_key(text) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the server's assignment key");
                return;
            }
        };
        match self.reported.jobs.assignment_key() {
            Some(known) if known == key => {}
            Some(_) => {
                if !self.key_mismatch_reported {
                    self.key_mismatch_reported = true;
                    tracing::error!(
                        "the server names another assignment key than the one this agent trusts; \
                         its assignments will be refused (enroll again to trust the new key)"
                    );
                }
            }
            None => {
                let stored = crate::state::AssignmentKey {
                    public_key: drover_proto::signing::public_key_hex(&key),
                    learned_at: Utc::now(),
                    learned_from: "heartbeat".to_owned(),
                };
                match self.dir.save_assignment_key(Some(&stored)) {
                    Ok(()) => {
                        tracing::info!(
                            key = %stored.public_key,
                            "learned the server's assignment key; assignments must be signed from now on"
                        );
                        self.reported.jobs.trust_assignment_key(key);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep the server's assignment key; will try again")
                    }
                }
            }
        }
    }

    fn contact_ok(&mut self, interval_secs: u64) {
        let now = Utc::now();
        if self.backoff.failures > 0 {
            tracing::info!(
                failures = self.backoff.failures,
                "reconnected to the server"
            );
        }
        self.backoff.reset();
        let had_error = self.local.last_error.is_some();
        self.local.agent_id = Some(self.session.agent_id().to_owned());
        self.local.server = Some(self.session.client().server().to_owned());
        self.local.last_contact_at = Some(now);
        self.local.last_error = None;
        self.local.heartbeat_interval_secs = Some(interval_secs);
        let due = self
            .last_state_write
            .is_none_or(|t| now - t >= STATE_WRITE_EVERY);
        if had_error || due {
            self.save_state();
        }
    }

    fn save_state(&mut self) {
        match self.dir.save_local_state(&self.local) {
            Ok(()) => self.last_state_write = Some(Utc::now()),
            Err(e) => tracing::warn!(error = %e, "could not write local state"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(8));
        let ceilings = [1, 2, 4, 8, 8, 8];
        for c in ceilings {
            let d = b.next();
            let c = Duration::from_secs(c);
            assert!(d >= c / 2 && d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
        }
        assert_eq!(b.failures, 6);
        b.reset();
        assert!(b.next() <= Duration::from_secs(1));
    }

    #[test]
    fn heartbeats_are_spread() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
    }
}
