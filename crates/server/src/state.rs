//! What every request handler can reach.

use std::sync::Arc;

use drover_store::Store;
use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::auth::SigningKey;
use crate::config::ServerConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Shared by all handlers; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub signing_key: SigningKey,
    /// The secrets vault, its data key unwrapped at start.
    pub vault: Arc<crate::vault::Vault>,
    /// Signs assignments as they are handed out (`sealing`).
    pub assignment_signer: Arc<drover_proto::signing::Signer>,
    /// Its public key (hex), told to agents at enrollment and heartbeats.
    pub assignment_key: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub artifacts: ArtifactStore,
    /// The login throttle: bounded password checks, lockouts.
    pub logins: Arc<crate::throttle::LoginGuard>,
    /// Request rate limits per user and per token.
    pub limiter: Arc<crate::ratelimit::Limiter>,
    /// Cancelled when the server shuts down; long-polls return at once.
    pub shutdown: CancellationToken,
    /// `sha256:HEX` of the certificate served over HTTPS (`None`: plain
    /// HTTP); token answers carry it so agents can pin it.
    pub tls_fingerprint: Option<String>,
}
