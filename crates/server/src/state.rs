//! What every request handler can reach.

use std::sync::Arc;

use drover_store::Store;

use crate::auth::SigningKey;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// Shared by all handlers; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    pub signing_key: SigningKey,
    pub metrics: Arc<Metrics>,
}
