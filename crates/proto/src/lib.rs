//! The wire model of Drover: every type that crosses the network between the
//! server, the agents and the CLI, plus the small pure rules about them
//! (label syntax, agent health).
//!
//! Key design decision: this crate has no HTTP, SQL or async code, so the
//! agent can depend on it and stay small. OpenAPI schemas are derived only
//! when the server turns on the `openapi` feature.

pub mod access;
pub mod agent;
pub mod api;
pub mod approvals;
pub mod audit;
pub mod error;
pub mod glob;
pub mod jobs;
pub mod labels;
pub mod limits;
pub mod metrics_text;
pub mod policies;
pub mod sandbox;
pub mod schedules;
pub mod scripts;
pub mod secrets;
pub mod signing;
pub mod unique;
pub mod workflows;
pub mod yaml;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};

/// Prefix of every REST path.
pub const API_PREFIX: &str = "/api/v1";

/// The version of this build, reported by agents in their heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
