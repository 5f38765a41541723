//! The audit log: every state-changing API call, who made it, on what, and
//! how it ended. Written by the `record` middleware (or by a handler in the
//! transaction of its change), read by `drover audit list`, checked by
//! `drover audit verify` and exported by `drover audit export`. The rows
//! form a hash chain (`drover_store::audit`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use drover_proto::audit::{AuditBreak, AuditExportRow, AuditVerification};
use drover_proto::jobs::AuditEntry;
use drover_store::jobs::{AuditEntry as NewEntry, AuditFilter};
use drover_store::{Error as StoreError, Tx};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::hash_token;
use crate::error::{ApiError, ApiQuery};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit))
        .routes(routes!(verify_audit))
        .routes(routes!(export_audit))
}

/// Walks the audit log's hash chain and reports the first row that was
/// edited, inserted or deleted.
#[utoipa::path(
    get, path = "/api/v1/audit/verify", tag = "audit",
    security(("user" = [])),
    responses(
        (status = 200, body = AuditVerification, description = "The chain's state: ok, or the first break (also answered 200: the check itself worked)"),
        (status = 403, body = drover_proto::ErrorBody, description = "Needs an admin"),
    )
)]
async fn verify_audit(
    State(state): State<AppState>,
    Admin(_user): Admin,
) -> Result<Json<AuditVerification>, ApiError> {
    let v = verify(&state).await?;
    Ok(Json(AuditVerification {
        ok: v.broken.is_none(),
        count: v.count,
        head_id: v.head_id,
        head_hash: v.head_hash,
        broken: v.broken.map(|b| AuditBreak {
            row: b.row(),
            kind: b.kind().to_owned(),
            message: b.to_string(),
        }),
    }))
}

/// Walks the chain, counting and logging a break. Shared by the API and
/// the dashboard.
pub(crate) async fn verify(
    state: &AppState,
) -> Result<drover_store::audit::Verification, ApiError> {
    let v = state.store.verify_audit().await?;
    if let Some(b) = &v.broken {
        state.metrics.audit_verify_failed();
        tracing::error!(row = b.row(), problem = %b, checked = v.count, "the audit log's hash chain is broken");
    }
    Ok(v)
}

/// Export formats.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum ExportFormat {
    /// JSON Lines: one row per line.
    #[default]
    Jsonl,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    /// Only rows at or after this time (RFC 3339) [default: all].
    since: Option<DateTime<Utc>>,
    /// Only `jsonl` [default].
    #[param(inline)]
    format: Option<ExportFormat>,
}

/// Rows of the audit log with their hashes, oldest first, one JSON object
/// per line, so that anyone can recompute the chain.
#[utoipa::path(
    get, path = "/api/v1/audit/export", tag = "audit",
    params(ExportQuery),
    security(("user" = [])),
    responses(
        (status = 200, content_type = "application/x-ndjson", body = AuditExportRow, description = "One row per line, oldest first"),
        (status = 403, body = drover_proto::ErrorBody, description = "Needs an admin"),
    )
)]
async fn export_audit(
    State(state): State<AppState>,
    Admin(_user): Admin,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let ExportFormat::Jsonl = q.format.unwrap_or_default();
    let since = q.since;
    // Rows read a page at a time while the answer is sent: memory stays
    // one page whatever the log's size. Rows appended meanwhile come too.
    let first = state.store.audit_rows(0, since, EXPORT_PAGE).await?;
    let pages = futures_util::stream::unfold(
        (state.store.clone(), Some(first)),
        move |(store, page)| async move {
            let page = match page {
                Some(p) => p,
                None => return None,
            };
            let last = page.last()?.id;
            let mut body = Vec::with_capacity(page.len() * 256);
            for r in &page {
                let row = AuditExportRow {
                    id: r.id,
                    at: drover_store::time_from_ms(r.at),
                    at_ms: r.at,
                    actor: r.actor.clone(),
                    action: r.action.clone(),
                    target: r.target.clone(),
                    status: r.status,
                    outcome: r.outcome.clone(),
                    request: r.request.clone(),
                    source: r.source.clone(),
                    detail: r.detail.clone(),
                    prev_hash: r.prev_hash.clone(),
                    hash: r.hash.clone(),
                };
                if let Err(e) = serde_json::to_writer(&mut body, &row) {
                    return Some((Err(std::io::Error::other(e)), (store, None)));
                }
                body.push(b'\n');
            }
            let next = if (page.len() as i64) < EXPORT_PAGE {
                None
            } else {
                match store.audit_rows(last, since, EXPORT_PAGE).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, after = last, "audit export: reading the next page failed");
                        return Some((Err(std::io::Error::other(e)), (store, None)));
                    }
                }
            };
            Some((Ok(bytes::Bytes::from(body)), (store, next)))
        },
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}

/// Rows per page of an export.
const EXPORT_PAGE: i64 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only calls by this user.
    actor: Option<String>,
    /// Only calls whose action or request contains this text, e.g.
    /// "job.cancel" or "jobs".
    action: Option<String>,
    /// Only calls on this target or targets starting with it, e.g.
    /// "job:01J" or "agent:".
    target: Option<String>,
    /// Only calls at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// At most this many, newest first [default 100, at most 1000].
    limit: Option<i64>,
}

/// Audit entries, newest first.
#[utoipa::path(
    get, path = "/api/v1/audit", tag = "audit",
    params(AuditQuery),
    security(("user" = [])),
    responses((status = 200, body = [AuditEntry]), (status = 403, body = drover_proto::ErrorBody, description = "Needs an admin"))
)]
async fn list_audit(
    State(state): State<AppState>,
    Admin(_user): Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let rows = state
        .store
        .list_audit(&AuditFilter {
            actor: q.actor,
            action: q.action,
            target: q.target,
            since: q.since,
            before: None,
            limit: q.limit.unwrap_or(100).clamp(1, 1000),
        })
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                at: drover_store::time_from_ms(r.at),
                actor: r.actor,
                action: r.action,
                target: r.target,
                status: r.status as u16,
                outcome: r.outcome,
                request: r.request,
                source: r.source.filter(|s| !s.is_empty()),
                detail: r
                    .detail
                    .as_deref()
                    .filter(|d| !d.is_empty())
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default(),
            })
            .collect(),
    ))
}

/// True for calls that change state and are made by people: every
/// non-GET call of the API, and enrollment, but not the agents' routine
/// traffic (polls, output, leases, results, heartbeats, refreshes), which
/// has its own records. The dashboard's forms (`/ui/...`) are audited
/// like the API calls they stand for.
fn audited(method: &Method, path: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    if path.starts_with("/ui/") {
        return true;
    }
    if !path.starts_with("/api/v1/") {
        return false;
    }
    !path.starts_with("/api/v1/agent/") || path == "/api/v1/agent/enroll"
}

/// What an API call does, in the audit's words: the action
/// (`KIND.VERB`) and its target (`KIND:ID`, or the kind alone when the
/// call names no object), from the route and the path. Handlers that
/// create an object name it afterwards (`Audit::target`).
fn describe(method: &Method, route: &str, path: &str) -> (String, String) {
    let strip = |p: &str| -> String {
        p.strip_prefix("/api/v1/")
            .or_else(|| p.strip_prefix("/ui/"))
            .unwrap_or(p)
            .to_owned()
    };
    let (route, path) = (strip(route), strip(path));
    let route: Vec<&str> = route.split('/').filter(|s| !s.is_empty()).collect();
    let values: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let segments: Vec<(&str, Option<&str>)> = route
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.starts_with('{') {
                (*r, Some(values.get(i).copied().unwrap_or("")))
            } else {
                (*r, None)
            }
        })
        .collect();
    // Calls whose words read better than the generic ones.
    match (method.as_str(), route.join("/").as_str()) {
        ("POST", "actions") => return ("action.apply".into(), "catalog".into()),
        ("POST", "scripts") => return ("script.add".into(), "script".into()),
        // The dashboard's login and logout, named like the API's.
        ("POST", "login") => return ("user.login".into(), "user".into()),
        ("POST", "logout") => return ("user.logout".into(), "user".into()),
        ("PATCH", "agents/{id}/labels") => {
            let id = values.get(1).copied().unwrap_or("");
            return (
                "agent.label".into(),
                format!("agent:{}", percent_decode(id)),
            );
        }
        _ => {}
    }
    let (kind, rest): (&str, &[(&str, Option<&str>)]) = match segments.as_slice() {
        [("workflows", None), ("runs", None), rest @ ..] => ("run", rest),
        [("workflows", None), rest @ ..] => ("workflow", rest),
        [("auth", None), rest @ ..] => ("user", rest),
        [(first, None), rest @ ..] => (singular(first), rest),
        _ => ("api", &[][..]),
    };
    let id = rest.iter().find_map(|(_, v)| *v);
    let verbs: Vec<&str> = rest
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(s, _)| *s)
        .collect();
    let verb = if verbs.is_empty() {
        match *method {
            Method::POST => "create".to_owned(),
            Method::PUT => "set".to_owned(),
            Method::PATCH => "update".to_owned(),
            Method::DELETE => "delete".to_owned(),
            _ => method.as_str().to_ascii_lowercase(),
        }
    } else {
        verbs.join("-")
    };
    let target = match id {
        Some(id) => format!("{kind}:{}", percent_decode(id)),
        None => kind.to_owned(),
    };
    (format!("{kind}.{verb}"), target)
}

/// `jobs` → `job`, `sandboxes` → `sandbox`, `fleet` → `fleet`.
fn singular(plural: &str) -> &str {
    if let Some(s) = plural.strip_suffix("xes") {
        &plural[..s.len() + 1]
    } else if let Some(s) = plural.strip_suffix('s') {
        s
    } else {
        plural
    }
}

/// A path segment as the user wrote it (`%20` back to a space).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What the audit knows of a call while it runs, shared between the
/// `record` middleware and the handler: the user (filled in by the
/// `UserAuth` extractor, so the middleware looks no token up), what the
/// call does to what and its details (the handler adds them), and whether
/// the handler already wrote the entry in its own transaction.
#[derive(Debug, Default)]
struct Call {
    action: String,
    target: String,
    /// `METHOD /route`.
    request: String,
    /// The caller's address.
    source: String,
    detail: BTreeMap<String, String>,
    actor: Option<String>,
    /// The status of the entry the handler wrote with its change.
    written: Option<StatusCode>,
}

impl Call {
    fn detail_text(&self) -> String {
        if self.detail.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&self.detail).unwrap_or_default()
        }
    }
}

/// The audit entry of the current call, for handlers that name what they
/// created, add details, or write the entry in the transaction of the
/// change itself (one commit instead of two). Outside an audited call (or
/// in tests without the middleware) it does nothing.
#[derive(Debug, Clone, Default)]
pub struct Audit(Option<Arc<Mutex<Call>>>);

fn lock(call: &Mutex<Call>) -> std::sync::MutexGuard<'_, Call> {
    call.lock().unwrap_or_else(|e| e.into_inner())
}

/// Longest detail value kept (a reason, a selector): longer ones are cut.
const MAX_DETAIL_CHARS: usize = 512;

impl Audit {
    /// Notes who is calling (the `UserAuth` extractor does this).
    pub(crate) fn set_actor(parts: &Parts, username: &str) {
        if let Some(Audit(Some(call))) = parts.extensions.get::<Audit>() {
            lock(call).actor = Some(username.to_owned());
        }
    }

    /// Names the caller when no token does: the user name a login tried.
    pub fn actor(&self, username: &str) {
        if let Some(call) = &self.0 {
            lock(call).actor = Some(username.to_owned());
        }
    }

    /// Names what the call acted on, `KIND:ID` (what it created, or the
    /// full id an id prefix resolved to).
    pub fn target(&self, target: impl Into<String>) {
        if let Some(call) = &self.0 {
            lock(call).target = target.into();
        }
    }

    /// Adds a detail (a reason, an action, a selector); empty values are
    /// left out, long ones cut.
    pub fn note(&self, key: &str, value: impl AsRef<str>) {
        let value = value.as_ref();
        if value.is_empty() {
            return;
        }
        if let Some(call) = &self.0 {
            let value = match value.char_indices().nth(MAX_DETAIL_CHARS) {
                Some((cut, _)) => format!("{}…", &value[..cut]),
                None => value.to_owned(),
            };
            lock(call).detail.insert(key.to_owned(), value);
        }
    }

    /// Appends the call's entry, ending with `status`, to `tx`; when the
    /// handler then answers `status`, the middleware writes none.
    pub async fn write(&self, tx: &mut Tx, status: StatusCode) -> Result<(), StoreError> {
        let Some(call) = &self.0 else {
            return Ok(());
        };
        let (actor, action, target, request, source, detail) = {
            let c = lock(call);
            (
                c.actor.clone().unwrap_or_else(|| "anonymous".to_owned()),
                c.action.clone(),
                c.target.clone(),
                c.request.clone(),
                c.source.clone(),
                c.detail_text(),
            )
        };
        tx.audit(
            &NewEntry {
                actor: &actor,
                action: &action,
                target: &target,
                status: status.as_u16(),
                outcome: outcome(status),
                request: &request,
                source: &source,
                detail: &detail,
            },
            Utc::now(),
        )
        .await?;
        // Marked before the commit: if it fails, the handler answers
        // another status and the middleware writes that entry instead.
        lock(call).written = Some(status);
        Ok(())
    }
}

impl Audit {
    /// Leaves the current call out of the audit log when it is answered
    /// `status` (the rate limits' 429: a storm must not become a storm of
    /// database writes; `drover_rate_limited_total` counts them).
    pub(crate) fn skip_call(parts: &Parts, status: StatusCode) {
        if let Some(audit) = parts.extensions.get::<Audit>() {
            audit.skip(status);
        }
    }

    /// Leaves the call out of the audit log: for answers that must stay
    /// cheap under a flood (a login refused by the throttle, whose lockout
    /// has an entry of its own).
    pub fn skip(&self, status: StatusCode) {
        if let Some(call) = &self.0 {
            lock(call).written = Some(status);
        }
    }
}

impl Audit {
    /// The entry of work the server does by itself for `actor` (a
    /// schedule's slot): `action` and `request` as an API call would have
    /// them, `source` naming what did it (`schedule NAME`). Written only
    /// through [`Audit::write`], in the transaction of the change.
    pub(crate) fn internal(actor: &str, action: &str, request: &str, source: &str) -> Audit {
        Audit(Some(Arc::new(Mutex::new(Call {
            action: action.to_owned(),
            request: request.to_owned(),
            source: source.to_owned(),
            actor: Some(actor.to_owned()),
            ..Call::default()
        }))))
    }

    /// Writes the entry in a transaction of its own, unless it was written
    /// with the change already: for server work calling code whose entry
    /// the middleware would write after the answer.
    pub(crate) async fn write_alone(
        &self,
        store: &drover_store::Store,
        status: StatusCode,
    ) -> Result<(), StoreError> {
        let written = self.0.as_ref().and_then(|c| lock(c).written);
        if written.is_some() {
            return Ok(());
        }
        let mut tx = store.begin().await?;
        self.write(&mut tx, status).await?;
        tx.commit().await.map(drop)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Audit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Audit>().cloned().unwrap_or_default())
    }
}

fn outcome(status: StatusCode) -> &'static str {
    // A dashboard form answers a redirect when it worked.
    if status.is_success() || status.is_redirection() {
        "ok"
    } else if status.is_client_error() {
        "refused"
    } else {
        "error"
    }
}

/// Middleware appending one audit entry per state-changing call (unless
/// the handler wrote it with its change).
pub async fn record(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if !audited(&method, &path) {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| hash_token(t.trim()));
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let (action, target) = describe(&method, &route, &path);
    let call = Arc::new(Mutex::new(Call {
        action,
        target,
        request: format!("{method} {route}"),
        source,
        ..Call::default()
    }));
    req.extensions_mut().insert(Audit(Some(call.clone())));
    let response = next.run(req).await;
    let status = response.status();
    let (known, written) = {
        let c = lock(&call);
        (c.actor.clone(), c.written)
    };
    if written == Some(status) {
        return response;
    }
    let actor = match (known, bearer) {
        (Some(actor), _) => actor,
        // The handler did not get as far as its user (refused early, or a
        // route without one): look the token up.
        (None, Some(hash)) => match state.store.user_token_by_hash(&hash).await {
            Ok(Some((_, user))) => user.username,
            _ => "unauthenticated".to_owned(),
        },
        (None, None) if path == "/api/v1/agent/enroll" => "bootstrap-token".to_owned(),
        (None, None) => "anonymous".to_owned(),
    };
    // Taken out of the lock, which is not held across the write.
    let (action, target, request, source, detail) = {
        let c = lock(&call);
        (
            c.action.clone(),
            c.target.clone(),
            c.request.clone(),
            c.source.clone(),
            c.detail_text(),
        )
    };
    let entry = NewEntry {
        actor: &actor,
        action: &action,
        target: &target,
        status: status.as_u16(),
        outcome: outcome(status),
        request: &request,
        source: &source,
        detail: &detail,
    };
    let result = state.store.audit(&entry, Utc::now()).await;
    if let Err(e) = result {
        tracing::error!(error = %e, %action, %target, "could not write the audit log");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_named_by_what_they_do_to_what() {
        let cases = [
            (
                Method::POST,
                "/api/v1/jobs",
                "/api/v1/jobs",
                "job.create",
                "job",
            ),
            (
                Method::POST,
                "/api/v1/jobs/{id}/cancel",
                "/api/v1/jobs/01J8/cancel",
                "job.cancel",
                "job:01J8",
            ),
            (
                Method::POST,
                "/api/v1/workflows/runs",
                "/api/v1/workflows/runs",
                "run.create",
                "run",
            ),
            (
                Method::POST,
                "/api/v1/workflows/runs/{id}/cancel",
                "/api/v1/workflows/runs/r1/cancel",
                "run.cancel",
                "run:r1",
            ),
            (
                Method::POST,
                "/api/v1/workflows/runs/{id}/workspace/remove",
                "/api/v1/workflows/runs/r1/workspace/remove",
                "run.workspace-remove",
                "run:r1",
            ),
            (
                Method::POST,
                "/api/v1/auth/login",
                "/api/v1/auth/login",
                "user.login",
                "user",
            ),
            (
                Method::POST,
                "/api/v1/agent/enroll",
                "/api/v1/agent/enroll",
                "agent.enroll",
                "agent",
            ),
            (
                Method::POST,
                "/api/v1/agents/{id}/revoke",
                "/api/v1/agents/a1/revoke",
                "agent.revoke",
                "agent:a1",
            ),
            (
                Method::PATCH,
                "/api/v1/agents/{id}/labels",
                "/api/v1/agents/a1/labels",
                "agent.label",
                "agent:a1",
            ),
            (
                Method::POST,
                "/api/v1/fleet/stop",
                "/api/v1/fleet/stop",
                "fleet.stop",
                "fleet",
            ),
            (
                Method::POST,
                "/api/v1/actions",
                "/api/v1/actions",
                "action.apply",
                "catalog",
            ),
            (
                Method::POST,
                "/api/v1/approvals/{id}/approve",
                "/api/v1/approvals/p1/approve",
                "approval.approve",
                "approval:p1",
            ),
            (
                Method::DELETE,
                "/api/v1/protections/{id}",
                "/api/v1/protections/7",
                "protection.delete",
                "protection:7",
            ),
            (
                Method::PUT,
                "/api/v1/secrets/{name}",
                "/api/v1/secrets/db%20pass",
                "secret.set",
                "secret:db pass",
            ),
            (
                Method::POST,
                "/api/v1/secrets/rotate-master-key",
                "/api/v1/secrets/rotate-master-key",
                "secret.rotate-master-key",
                "secret",
            ),
            (
                Method::PUT,
                "/api/v1/users/{name}/role",
                "/api/v1/users/bob/role",
                "user.role",
                "user:bob",
            ),
            (
                Method::POST,
                "/api/v1/sandboxes",
                "/api/v1/sandboxes",
                "sandbox.create",
                "sandbox",
            ),
            (
                Method::DELETE,
                "/api/v1/webhooks/{id}",
                "/api/v1/webhooks/w1",
                "webhook.delete",
                "webhook:w1",
            ),
        ];
        for (method, route, path, action, target) in cases {
            assert_eq!(
                describe(&method, route, path),
                (action.to_owned(), target.to_owned()),
                "{method} {route}"
            );
        }
    }

    #[test]
    fn audits_people_not_agent_chatter() {
        let cases = [
            (Method::POST, "/api/v1/jobs", true),
            (Method::PATCH, "/api/v1/agents/x/labels", true),
            (Method::POST, "/api/v1/auth/login", true),
            (Method::POST, "/api/v1/agent/enroll", true),
            (Method::GET, "/api/v1/jobs", false),
            (Method::POST, "/api/v1/agent/poll", false),
            (Method::POST, "/api/v1/agent/attempts/x/result", false),
            (Method::POST, "/metrics", false),
        ];
        for (m, p, want) in cases {
            assert_eq!(audited(&m, p), want, "{m} {p}");
        }
    }
}
