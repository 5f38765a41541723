//! Sends webhook deliveries: a POST of the JSON payload, signed with
//! HMAC-SHA256 of the body under the webhook's secret, retried with
//! exponential backoff and jitter until a 2xx answer or the last attempt.
//! Every attempt is appended to the delivery's history.
//!
//! Deliveries are queued in the transaction that ends a run, so a crash
//! never loses one; a delivery may be sent twice if the server dies between
//! the POST and recording it (receivers dedupe by `x-drover-delivery`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use drover_proto::workflows::{DeliveryAttempt, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER};
use drover_store::workflows::{DeliveryOutcome, DeliveryRecord};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Deliveries sent per round.
const BATCH: i64 = 32;
/// Longest wait between looks at the queue.
const IDLE: Duration = Duration::from_secs(1);

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `n + 1` after `n` failed ones.
pub fn backoff(n: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)));
    let capped = exp.min(max);
    capped.mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.2)
}

/// Sends due deliveries until `shutdown`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let policy = crate::egress::EgressPolicy::new(&state.config.webhook_allow);
    let client = match reqwest::Client::builder()
        .timeout(state.config.webhook_timeout)
        // Only addresses the policy allows are ever connected to.
        .dns_resolver(Arc::new(crate::egress::Resolver {
            policy: policy.clone(),
        }))
        .no_proxy()
        .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are not sent");
            return;
        }
    };
    loop {
        let due = match state.store.due_deliveries(Utc::now(), BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading due webhook deliveries failed");
                Vec::new()
            }
        };
        let full = due.len() as i64 == BATCH;
        for d in due {
            if shutdown.is_cancelled() {
                return;
            }
            deliver(&state, &client, &policy, d).await;
        }
        if full {
            continue;
        }
        let wait = match state.store.next_delivery_at().await {
            Ok(Some(at)) => (at - Utc::now()).to_std().unwrap_or_default().min(IDLE),
            _ => IDLE,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.hub.deliveries.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn deliver(
    state: &AppState,
    client: &reqwest::Client,
    policy: &crate::egress::EgressPolicy,
    d: DeliveryRecord,
) {
    let body = d.payload.clone().into_bytes();
    let mut req = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, d.event.as_str())
        .header(DELIVERY_HEADER, &d.id);
    // The secret is sealed in the vault; opened only to sign.
    let mut unsealed = None;
    if let Some(stored) = &d.secret {
        match state.vault.webhook_secret(stored) {
            Ok(secret) => req = req.header(SIGNATURE_HEADER, signature(&secret, &body)),
            Err(e) => unsealed = Some(format!("webhook secret: {e}")),
        }
    }
    let at = Utc::now();
    let clock = Instant::now();
    // A literal address never reaches the resolver: checked here (also
    // for deliveries queued before the policy changed).
    let refused = unsealed.or_else(|| policy.check_url(&d.url).err());
    let (status, error) = match refused {
        Some(why) => (None, Some(format!("refused: {why}"))),
        None => match req.body(body).send().await {
            Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
            Ok(resp) => (
                Some(resp.status().as_u16()),
                Some(format!("answered {}", resp.status())),
            ),
            Err(e) => (None, Some(describe(&e))),
        },
    };
    let attempt = DeliveryAttempt {
        at,
        status,
        error: error.clone(),
        duration_ms: clock.elapsed().as_millis() as u64,
    };
    let n = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
    let outcome = if error.is_none() {
        DeliveryOutcome::Delivered
    } else if n >= state.config.webhook_max_attempts {
        DeliveryOutcome::GaveUp
    } else {
        let wait = backoff(
            n,
            state.config.webhook_backoff,
            state.config.webhook_max_backoff,
            fastrand::f64(),
        );
        DeliveryOutcome::RetryAt(
            Utc::now() + chrono::Duration::milliseconds(wait.as_millis() as i64),
        )
    };
    match &outcome {
        DeliveryOutcome::Delivered => {
            tracing::info!(delivery = %d.id, run = %d.run_id, url = %crate::egress::redact_url(&d.url), attempt = n, "webhook delivered")
        }
        DeliveryOutcome::RetryAt(t) => {
            tracing::warn!(delivery = %d.id, url = %crate::egress::redact_url(&d.url), attempt = n, error = error.as_deref(), retry_at = %t, "webhook failed; will retry")
        }
        DeliveryOutcome::GaveUp => {
            tracing::warn!(delivery = %d.id, url = %crate::egress::redact_url(&d.url), attempt = n, error = error.as_deref(), "webhook failed; giving up")
        }
    }
    state.metrics.webhook_attempt(error.is_none());
    if let Err(e) = state
        .store
        .record_delivery_attempt(&d.id, &attempt, &outcome)
        .await
    {
        tracing::warn!(delivery = %d.id, error = %e, "recording a webhook attempt failed");
    }
}

/// A reqwest error with its causes, which say what really happened.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(10);
        let table = [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (30, 10)];
        for (n, secs) in table {
            assert_eq!(
                backoff(n, base, max, 0.0),
                Duration::from_secs(secs),
                "n={n}"
            );
        }
        assert!(backoff(1, base, max, 1.0) <= Duration::from_millis(1200));
    }
}
