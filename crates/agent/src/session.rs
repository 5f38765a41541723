//! The agent's credentials, shared by every task that talks to the server
//! (heartbeat, poll, leases, logs, results).
//!
//! A refresh token is single-use and presenting a spent one ends the
//! session, so refreshes are serialized behind one async mutex, and a task
//! whose token expired refreshes only if nobody else has done so meanwhile.
//! A terminal refusal seen by any task stops the whole agent.
//!
//! A refresh runs in its own task that owns the lock: if the caller is
//! dropped mid-refresh (a select picked another branch), the rotated
//! credentials are still stored instead of being lost with a spent token.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};
use crate::state::{StateDir, StoredCredentials};

/// Refresh the access token ahead of expiry by at most this much.
const REFRESH_MARGIN: chrono::Duration = chrono::Duration::seconds(60);

struct Held {
    creds: StoredCredentials,
    /// When this process obtained the current access token (or loaded it),
    /// to size the refresh margin for short-lived tokens.
    obtained_at: DateTime<Utc>,
}

pub(crate) struct Session {
    client: Client,
    dir: StateDir,
    agent_id: String,
    held: Arc<tokio::sync::Mutex<Held>>,
    /// Cancelled when the server refused the credentials for good.
    rejected: CancellationToken,
    why: Mutex<Option<String>>,
}

impl Session {
    pub(crate) fn new(client: Client, dir: StateDir, creds: StoredCredentials) -> Session {
        Session {
            client,
            dir,
            agent_id: creds.agent_id.clone(),
            held: Arc::new(tokio::sync::Mutex::new(Held {
                creds,
                obtained_at: Utc::now(),
            })),
            rejected: CancellationToken::new(),
            why: Mutex::new(None),
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Cancelled once any task got a terminal refusal.
    pub(crate) fn rejected(&self) -> &CancellationToken {
        &self.rejected
    }

    /// Why the credentials were refused, once they were.
    pub(crate) fn rejection(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn reject(&self, why: String) {
        let mut slot = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::error!(error = %why, "credentials refused for good; stopping");
            *slot = Some(why);
        }
        self.rejected.cancel();
    }

    /// A current access token, refreshed first when it is about to expire.
    async fn token(&self) -> Result<String, ClientError> {
        let held = self.held.clone().lock_owned().await;
        let lifetime = held.creds.access_expires_at - held.obtained_at;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        if held.creds.access_expires_at - Utc::now() < margin {
            return self.refresh(held).await;
        }
        Ok(held.creds.access_token.clone())
    }

    /// Refreshes unless the token that failed is no longer the current one
    /// (another task refreshed meanwhile).
    async fn refresh_if_current(&self, failed: &str) -> Result<String, ClientError> {
        let held = self.held.clone().lock_owned().await;
        if held.creds.access_token == failed {
            return self.refresh(held).await;
        }
        Ok(held.creds.access_token.clone())
    }

    /// Trades the refresh token, in a task of its own holding the lock.
    async fn refresh(&self, mut held: OwnedMutexGuard<Held>) -> Result<String, ClientError> {
        let client = self.client.clone();
        let dir = self.dir.clone();
        let task = tokio::spawn(async move {
            let fresh = client.refresh(&held.creds.refresh_token).await?;
            held.creds.access_token = fresh.access_token;
            held.creds.access_expires_at = fresh.access_expires_at;
            held.creds.refresh_token = fresh.refresh_token;
            held.obtained_at = Utc::now();
            // The old refresh token is spent: if this write fails, a restart
            // would present it again and the server would end the session.
            if let Err(e) = dir.save_credentials(&held.creds) {
                tracing::error!(error = %e, "could not persist rotated credentials");
            }
            tracing::debug!("credentials refreshed");
            Ok(held.creds.access_token.clone())
        });
        task.await
            .map_err(|e| ClientError::Protocol(format!("the refresh task failed: {e}")))?
    }

    /// Waits for a refresh in flight to be stored (before the agent exits).
    pub(crate) async fn settle(&self) {
        drop(self.held.lock().await);
    }

    /// Runs one authenticated call: with a fresh token, refreshing and
    /// retrying once when the server says the token expired. A terminal
    /// refusal marks the session rejected before it is returned.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Client, String) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let result = async {
            let token = self.token().await?;
            match f(self.client.clone(), token.clone()).await {
                Err(e) if e.is_token_expired() => {
                    let fresh = self.refresh_if_current(&token).await?;
                    f(self.client.clone(), fresh).await
                }
                other => other,
            }
        }
        .await;
        if let Err(e) = &result {
            if e.is_terminal() {
                self.reject(e.to_string());
            }
        }
        result
    }
}

/// Jittered wait honouring a server's Retry-After: between the given time
/// and a quarter more, so that agents told the same do not return at once.
pub(crate) fn retry_after_jittered(retry_after: Duration) -> Duration {
    retry_after + retry_after.mul_f64(0.25 * fastrand::f64())
}
