//! Global webhooks (sent for every run that ends) and the delivery log of
//! every webhook, global or from a definition.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use drover_proto::workflows::{CreateWebhookRequest, Webhook, WebhookDelivery, WebhookEvent};
use drover_proto::ErrorBody;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::Admin;
use crate::auth::UserAuth;
use crate::egress::redact_url;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::routes::audit::Audit;
use crate::state::AppState;
use crate::workflow::def::check_webhook_url;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(delete_webhook))
        .routes(routes!(list_deliveries))
}

/// Add a webhook called for every run that ends.
#[utoipa::path(
    post, path = "/api/v1/webhooks", tag = "webhooks",
    request_body = CreateWebhookRequest,
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 201, body = Webhook), (status = 422, body = ErrorBody))
)]
async fn create_webhook(
    State(state): State<AppState>,
    Admin(user): Admin,
    audit: Audit,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> Result<(StatusCode, Json<Webhook>), ApiError> {
    audit.note("url", redact_url(&req.url));
    check_webhook_url(&req.url).map_err(ApiError::invalid)?;
    crate::egress::EgressPolicy::new(&state.config.webhook_allow)
        .check_url(&req.url)
        .map_err(ApiError::invalid)?;
    if req.secret.len() < 16 || req.secret.len() > 256 {
        return Err(ApiError::invalid(
            "secret must be 16 to 256 bytes (it keys the HMAC-SHA256 signature)",
        ));
    }
    let events = if req.events.is_empty() {
        vec![WebhookEvent::Completed, WebhookEvent::Failed]
    } else {
        req.events
    };
    let now = Utc::now();
    let sealed = state
        .vault
        .seal_webhook_secret(&req.secret)
        .map_err(|e| ApiError::internal("sealing a webhook secret", &e))?;
    let id = state
        .store
        .create_webhook(&req.url, &sealed, &events, &user.username, now)
        .await?;
    audit.target(format!("webhook:{id}"));
    Ok((
        StatusCode::CREATED,
        Json(Webhook {
            id,
            url: redact_url(&req.url),
            events,
            created_by: user.username,
            created_at: now,
        }),
    ))
}

/// The global webhooks (secrets are never shown).
#[utoipa::path(
    get, path = "/api/v1/webhooks", tag = "webhooks",
    security(("user" = [])),
    responses((status = 200, body = [Webhook]))
)]
async fn list_webhooks(
    State(state): State<AppState>,
    _user: UserAuth,
) -> Result<Json<Vec<Webhook>>, ApiError> {
    let hooks = state.store.list_webhooks().await?;
    Ok(Json(
        hooks
            .into_iter()
            .map(|h| Webhook {
                id: h.id,
                url: redact_url(&h.url),
                events: h.events,
                created_by: h.created_by,
                created_at: h.created_at,
            })
            .collect(),
    ))
}

/// Remove a global webhook; queued deliveries are still sent.
#[utoipa::path(
    delete, path = "/api/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id or a unique prefix of it")),
    security(("user" = [])),
    responses((status = 403, body = ErrorBody, description = "Needs an admin"), (status = 204), (status = 404, body = ErrorBody))
)]
async fn delete_webhook(
    State(state): State<AppState>,
    Admin(_user): Admin,
    audit: Audit,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = state.store.resolve_webhook_id(&id).await?;
    audit.target(format!("webhook:{id}"));
    if state.store.delete_webhook(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("webhook '{id}' not found")))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeliveryQuery {
    /// Only deliveries of this run (id or unique prefix).
    run: Option<String>,
    /// At most this many, newest first [default 50, at most 1000].
    limit: Option<i64>,
}

/// Webhook deliveries with every attempt made.
#[utoipa::path(
    get, path = "/api/v1/webhooks/deliveries", tag = "webhooks",
    params(DeliveryQuery),
    security(("user" = [])),
    responses(
        (status = 200, body = [WebhookDelivery]),
        (status = 404, body = ErrorBody, description = "No run has the id given as `run`"),
    )
)]
async fn list_deliveries(
    State(state): State<AppState>,
    _user: UserAuth,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> Result<Json<Vec<WebhookDelivery>>, ApiError> {
    let run = match &q.run {
        Some(r) => Some(state.store.resolve_run_id(r).await?),
        None => None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let list = state.store.deliveries(run.as_deref(), limit).await?;
    Ok(Json(
        list.into_iter()
            .map(|d| WebhookDelivery {
                id: d.id,
                run_id: d.run_id,
                url: redact_url(&d.url),
                event: d.event,
                state: d.state,
                attempts: u32::try_from(d.attempts).unwrap_or(0),
                next_attempt_at: d.next_at,
                created_at: d.created_at,
                delivered_at: d.delivered_at,
                history: d.history,
            })
            .collect(),
    ))
}
