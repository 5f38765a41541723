//! The tamper-evident audit log on the wire: what `GET /audit/verify`
//! answers and what each line of `GET /audit/export` holds.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The result of walking the audit log's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditVerification {
    /// True when every row up to the head is in place and unchanged.
    pub ok: bool,
    /// Rows checked and found sound (up to the break, if any).
    pub count: u64,
    /// The id of the chain's last row (0 while the log is empty).
    pub head_id: i64,
    /// The hash of the chain's last row: note it elsewhere to catch a
    /// rewrite of the whole chain later.
    pub head_hash: String,
    /// The first problem, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<AuditBreak>,
}

/// Where the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditBreak {
    /// The row named: the edited or inserted row, or the first row after
    /// a deletion.
    pub row: i64,
    /// `edited`, `deleted` or `inserted`.
    pub kind: String,
    /// e.g. "row 17 was edited", "a row before 18 was deleted".
    pub message: String,
}

/// One line of an export (JSON Lines): a row with its links, enough to
/// recompute `hash` (see docs/SECURITY.md for the encoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditExportRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `at` in milliseconds since the Unix epoch: the value hashed.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub status: i64,
    pub outcome: String,
    /// The call behind the row; absent on rows hashed with version 1 of
    /// the encoding, present (maybe empty) on version 2 rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The caller's address (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The details as stored: a JSON object's text (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The hash of the row before (64 zeros for the first row).
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}
